"""The `refgen` command as a person runs it: exit codes, progress, broker loss, the demo."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import redis

from tasks import exit_codes
from tasks.client import JobEvents, JobHistory, follow
from tasks.harness import (
    JobRunner,
    WorkerProcess,
    bare_client,
    base_worker_env,
    local_worker_env,
)
from tasks.localredis import RedisServer, free_port
from tasks.progress import ProgressView
from tests.integration.conftest import DOOMED
from worker import constants as c
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]


def refgen(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        env=env,
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def client_env(redis_server) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_server.url}


def write(tmp_path: Path, plan: object) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
    return path


def done_id(done: subprocess.CompletedProcess[str]) -> str:
    return json.loads(done.stdout)["job_id"]


def test_run_prints_the_result_and_plain_progress(worker, client_env, load_plan, tmp_path) -> None:
    done = refgen(
        "run",
        str(write(tmp_path, load_plan("typical_2x2"))),
        "--duration-seconds",
        "180",
        env=client_env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "success"
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"sent job {done_id(done)} to redis://127.0.0.1:")
    assert lines[1] == "started: 4 images"
    assert any(line.startswith("done scene city_street in ") for line in lines)
    assert lines[-1].startswith("completed: 4/4 images")
    assert "\x1b[" not in done.stderr  # not a terminal: no bar, no escape codes


def test_run_exit_codes(worker, client_env, load_plan, tmp_path) -> None:
    not_json = refgen("run", str(write(tmp_path, "{ nope")), env=client_env)
    assert (not_json.returncode, not_json.stdout) == (2, "")
    assert "not JSON" in not_json.stderr

    invalid = refgen("run", str(ROOT / "tests" / "data" / "invalid_plan.json"), env=client_env)
    assert invalid.returncode == 2
    assert "invalid plan" in invalid.stderr and "scenes.0.id" in invalid.stderr

    too_poor = refgen(
        "run",
        str(write(tmp_path, load_plan("typical_2x2"))),
        "--duration-seconds",
        "0.001",
        env=client_env,
    )
    assert (too_poor.returncode, too_poor.stdout.strip()) == (1, "null")
    assert "error: Budget exceeded" in too_poor.stderr
    assert too_poor.stderr.splitlines()[-1].startswith(
        "refused for budget: 4 images are estimated at $0.024, over the job's limit of $"
    )
    assert "0/0" not in too_poor.stderr


def test_run_says_clearly_when_redis_cannot_be_reached(load_plan, tmp_path) -> None:
    # A grace period of an hour: a command that entered it would not end; this one gives up
    # at once.
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "BROKER_GRACE_S": "3600",
    }
    done = refgen("run", str(write(tmp_path, load_plan())), env=env, timeout=60)
    assert (done.returncode, done.stdout) == (exit_codes.BROKER, "")
    [said] = done.stderr.splitlines()  # at once, in one line: no "waiting up to 3600 s"
    assert said.startswith("refgen: cannot reach Redis at redis://127.0.0.1:")


def wait_running(redis_url: str, job_id: str, process: subprocess.Popen[str]) -> None:
    """Until the job's first image has started (its event is in the job's stream)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + 60
    try:
        while not any(
            c.EVENT_IMAGE_START in fields.get("message", "")
            for _, fields in client.xrange(c.events_stream(job_id))
        ):
            assert process.poll() is None and time.monotonic() < deadline, "the job never ran"
            time.sleep(0.1)
    finally:
        client.close()


def test_run_gives_up_clearly_when_redis_goes_for_good(load_plan, tmp_path) -> None:
    with RedisServer() as broker:
        env = {
            **base_worker_env(broker.url, tmp_path / "store"),
            "GENERATOR_BACKEND": "local",
            "STORAGE_BACKEND": "local",
            "LOCAL_GENERATOR_LATENCY_S": "30",
        }
        worker = WorkerProcess(env, tmp_path / "worker.log", "slow")
        worker.start(JobRunner(broker.url).client)
        plan = load_plan()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "tasks.cli", "run", str(write(tmp_path, plan))],
                env={**env, "BROKER_GRACE_S": "3"},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_running(broker.url, plan["job_id"], process)
            broker.stop()
            _, stderr = process.communicate(timeout=60)
        finally:
            assert worker.process is not None
            os.killpg(worker.process.pid, signal.SIGKILL)  # a warm stop waits out its 30 s image
            worker.process.wait()
    assert process.returncode == 3
    assert "lost Redis" in stderr and "is gone" in stderr


def test_demo_starts_what_it_needs_and_stops_it(tmp_path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_", "REFERENCE_"))}
    env.update(REDIS_URL=f"redis://127.0.0.1:{port}/0", LOCAL_GENERATOR_LATENCY_S="0.2")
    done = refgen("demo", env=env, cwd=tmp_path, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["status"] == "success" and result["total_references"] == 4
    assert "started redis-server" in done.stderr
    assert "started a worker" in done.stderr and "stopped the worker" in done.stderr
    assert any(line.startswith("done ") for line in done.stderr.splitlines())
    assert len(list((tmp_path / ".refgen" / "storage").rglob("*.png"))) == 4
    started_port = re.search(r"started redis-server on port (\d+)", done.stderr)
    assert started_port is not None
    leftovers = subprocess.run(
        ["pgrep", "-f", f"redis-server.*--port {started_port[1]} "],
        capture_output=True,
        text=True,
        check=False,
    )
    assert leftovers.stdout.strip() == ""  # it stopped the Redis it started


def test_make_demo_prints_the_json_alone(tmp_path) -> None:
    """`make demo > out.json` is the README's way to keep the result: make's echo of the command
    and the bootstrap's words go to stderr."""
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_", "REFERENCE_", "MAKE"))
    }
    env.update(
        REDIS_URL=f"redis://127.0.0.1:{port}/0",
        LOCAL_GENERATOR_LATENCY_S="0.1",
        LOCAL_STORAGE_DIR=str(tmp_path / "storage"),
    )
    done = subprocess.run(
        ["make", "--no-print-directory", "demo"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["status"] == "success", done.stdout[:500]


def test_run_on_a_terminal_shows_a_progress_bar(worker, client_env, load_plan, tmp_path) -> None:
    import pty

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "run", str(write(tmp_path, load_plan("typical_2x2")))],
        env={**client_env, "TERM": "xterm-256color", "COLUMNS": "120"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    os.close(terminal)
    screen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        screen += chunk
    stdout, _ = process.communicate(timeout=60)
    os.close(controller)
    assert process.returncode == 0
    assert json.loads(stdout)["status"] == "success"
    text = screen.decode("utf-8", "replace")
    assert "━" in text  # rich's bar
    assert "4/4" in text and "retries 0" in text and "$0.02" in text
    assert "done scene city_street" in text  # lines still scroll above the bar


def test_run_says_what_a_text_only_job_came_to(worker, client_env, load_plan, tmp_path) -> None:
    plan = load_plan("typical_2x2")
    plan["scenes"][0]["id"], plan["scenes"][1]["id"] = DOOMED  # no scene: text-only
    done = refgen("run", str(write(tmp_path, plan)), env=client_env)
    assert (done.returncode, done.stdout.strip()) == (1, "null")
    last = done.stderr.splitlines()[-1]
    assert last.startswith("text-only: 2 of 4 images made, too few for reference images")
    assert "failed: 2/4" not in done.stderr


def test_run_prints_the_budget_reason_even_when_the_result_lands_first(
    worker, redis_server, load_plan
) -> None:
    """A worker can refuse a job, announce it and store the result before `refgen run` reads
    anything (13 of 40 times under CPU load). Here that order is made certain: the result is
    in before the command's reading starts, from where it stood when it sent the job."""
    plan = load_plan("typical_2x2")
    job_id = plan["job_id"]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    app = bare_client(redis_server.url)
    cursor = JobHistory.read(client, job_id).last_id or "0-0"
    app.send_task(
        "reference_generator.start",
        kwargs={"job_id": job_id, "plan": plan, "duration_seconds": 0.001},
    )
    assert app.AsyncResult(job_id).get(timeout=30) is None  # refused, and stored
    shown = io.StringIO()
    code = follow(
        app,
        JobEvents(client, job_id, cursor),
        job_id,
        ProgressView(shown),
        timeout_s=30,
        settings=Settings(redis_url=redis_server.url),
        client=client,
    )
    client.close()
    assert code == exit_codes.TEXT_ONLY
    lines = shown.getvalue().splitlines()
    assert lines[0].startswith("error: Budget exceeded: this job is estimated at $0.024")
    assert lines[-1].startswith("refused for budget: 4 images are estimated at $0.024")


def test_a_job_id_that_has_a_result_is_shown_not_run_again(
    worker, client_env, load_plan, tmp_path
) -> None:
    plan = load_plan("minimal_1x1")
    path = write(tmp_path, plan)
    first = refgen("run", str(path), env=client_env)
    assert first.returncode == 0, first.stderr

    again = refgen("run", str(path), env=client_env)
    assert again.returncode == 0
    assert json.loads(again.stdout) == json.loads(first.stdout)
    assert f"job {plan['job_id']} has already run (completed: 2/2 images" in again.stderr
    assert "nothing was sent" in again.stderr
    assert f"refgen run {path} --job-id new" in again.stderr
    assert "started:" not in again.stderr

    fresh = refgen("run", str(path), "--job-id", "new", env=client_env)
    assert fresh.returncode == 0, fresh.stderr
    fresh_id = json.loads(fresh.stdout)["job_id"]
    assert fresh_id != plan["job_id"]
    assert f"sent job {fresh_id}" in fresh.stderr and "started: 2 images" in fresh.stderr


def test_a_refused_job_id_is_sent_again_and_shows_only_its_new_events(
    worker, client_env, load_plan, tmp_path
) -> None:
    """A refusal leaves nothing run, so its job id is not "already run": it is sent again."""
    plan = load_plan("minimal_1x1")
    path = write(tmp_path, plan)
    first = refgen("run", str(path), "--duration-seconds", "0.001", env=client_env)
    assert first.returncode == 1 and "refused for budget" in first.stderr
    again = refgen("run", str(path), "--duration-seconds", "0.001", env=client_env)
    assert again.returncode == 1
    assert again.stderr.startswith(f"sent job {plan['job_id']}")
    assert again.stderr.count("error: Budget exceeded") == 1  # not the first run's too
    assert "has already run" not in again.stderr


def test_a_refused_job_id_runs_when_sent_again_corrected(
    worker, client_env, load_plan, tmp_path
) -> None:
    path = write(tmp_path, load_plan("minimal_1x1"))
    refused = refgen("run", str(path), "--duration-seconds", "0.001", env=client_env)
    assert refused.returncode == 1 and "refused for budget" in refused.stderr
    corrected = refgen("run", str(path), "--duration-seconds", "180", env=client_env)
    assert corrected.returncode == 0, corrected.stderr
    assert json.loads(corrected.stdout)["status"] == "success"
    assert "started: 2 images" in corrected.stderr
    assert "refused" not in corrected.stderr  # only this run's events


def test_run_says_when_no_worker_takes_the_job_and_keeps_waiting(load_plan, tmp_path) -> None:
    with RedisServer() as broker:
        env = {
            **base_worker_env(broker.url, tmp_path / "store"),
            "GENERATOR_BACKEND": "local",
            "STORAGE_BACKEND": "local",
            "LOCAL_GENERATOR_LATENCY_S": "0.2",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "run", str(write(tmp_path, load_plan()))],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stderr or []))
        reader.start()
        deadline = time.monotonic() + 60
        while not any("no worker has taken job" in line for line in lines):
            assert process.poll() is None, lines
            assert time.monotonic() < deadline, lines
            time.sleep(0.1)
        worker = WorkerProcess(env, tmp_path / "worker.log", "late")
        try:
            worker.start(JobRunner(broker.url).client)
            stdout = (process.stdout.read() if process.stdout else "") or ""
            process.wait(timeout=60)
        finally:
            worker.stop()
        reader.join()
    warning = next(line for line in lines if "no worker has taken job" in line)
    # Said once the command had waited the 5 s the README promises, by its own count.
    waited = re.search(r"no worker has taken job \S+ after (\d+) s", warning)
    assert waited and int(waited.group(1)) >= 5, warning
    assert "none answers on redis://127.0.0.1:" in warning and "Still waiting" in warning
    assert process.returncode == 0, lines
    assert json.loads(stdout)["status"] == "success"
    assert lines.index(warning) < next(i for i, x in enumerate(lines) if x.startswith("started:"))


def test_ctrl_c_on_a_terminal_ends_cleanly_with_130(load_plan, tmp_path) -> None:
    with RedisServer() as broker:  # no worker: the command waits, drawing its bar
        controller, terminal = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "run", str(write(tmp_path, load_plan()))],
            env={**os.environ, "REDIS_URL": broker.url, "TERM": "xterm-256color"},
            cwd=ROOT,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=terminal,
            # A session of its own whose controlling terminal is the pty, as in a shell:
            # ^C typed there is a SIGINT to the command.
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(terminal)
        screen = read_until(controller, b"no worker has taken job", timeout_s=20)
        os.write(controller, b"\x03")
        screen += read_until(controller, None, timeout_s=20)
        process.wait(timeout=10)
        os.close(controller)
    text = screen.decode("utf-8", "replace")
    assert process.returncode == exit_codes.INTERRUPTED, text
    assert "interrupted; job " in text and "stays queued or running" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert process.stdout is not None and process.stdout.read() == b""


def read_until(fd: int, marker: bytes | None, timeout_s: float) -> bytes:
    """What a terminal shows, until ``marker`` appears (or, for None, until it closes)."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    while marker is None or marker not in seen:
        assert time.monotonic() < deadline, seen.decode("utf-8", "replace")
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        seen += chunk
    return seen


@pytest.mark.parametrize("command", ["run", "gateway", "worker", "beat"])
def test_a_malformed_redis_url_is_one_clear_line_and_exit_5(
    command: str, load_plan, tmp_path
) -> None:
    env = {**base_worker_env("redis://127.0.0.1:9/0", tmp_path), "REDIS_URL": "localhost:6379"}
    args = [command, str(write(tmp_path, load_plan()))] if command == "run" else [command]
    done = refgen(*args, env=env, timeout=60)
    assert done.returncode == exit_codes.CONFIGURATION == 5
    assert done.stderr.splitlines() == [
        "refgen: configuration error: REDIS_URL must be a URL such as "
        "redis://localhost:6379/0, not 'localhost:6379' (schemes: redis, rediss, unix)"
    ]
    assert done.stdout == ""


def test_run_help_says_the_job_id_is_a_uuid_and_lists_every_exit_code(tmp_path) -> None:
    done = refgen("run", "--help", env=dict(os.environ))
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "it must be a UUID, or 'new' for a fresh one" in text
    for code, meaning in exit_codes.MEANINGS:
        assert f"{code} {meaning}" in text
    bad = refgen("run", str(tmp_path / "plan.json"), "--job-id", "123", env=dict(os.environ))
    assert bad.returncode == 2
    assert "argument --job-id: '123' is not a UUID" in bad.stderr


def test_run_says_when_the_workers_start_of_the_job_failed(load_plan, tmp_path) -> None:
    """A fault on the worker (not a refusal) ends the wait with its reason, not "no worker has
    taken the job" for ever; the failure is stored under the start's own id, never the job's."""
    with RedisServer() as broker:
        env = local_worker_env(broker.url, tmp_path / "store")
        worker = WorkerProcess(
            {**env, "REFGEN_BUG_AT": "start.after_claim"}, tmp_path / "worker.log", "faulty"
        )
        worker.start(bare_client(broker.url))
        try:
            plan = load_plan()
            done = refgen("run", str(write(tmp_path, plan)), env=env, timeout=120)
            stored = redis.Redis.from_url(broker.url).exists(f"celery-task-meta-{plan['job_id']}")
        finally:
            worker.stop()
    assert done.returncode == exit_codes.WORKER_FAILED, done.stderr
    assert f"the worker failed to start job {plan['job_id']}: RuntimeError: injected fault at " in (
        done.stderr
    )
    assert "no worker has taken" not in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and not stored


def test_run_counts_only_the_workers_that_consume_the_jobs_queue(load_plan, tmp_path) -> None:
    with RedisServer() as broker:
        env = local_worker_env(broker.url, tmp_path / "store")
        elsewhere = WorkerProcess(
            {**env, "REFERENCE_GEN_QUEUES": "some_other_queue"}, tmp_path / "other.log", "other"
        )
        elsewhere.start(bare_client(broker.url))
        try:
            done = refgen(
                "run", str(write(tmp_path, load_plan())), "--timeout", "8", env=env, timeout=60
            )
        finally:
            elsewhere.stop()
    assert done.returncode == exit_codes.TIMEOUT, done.stderr
    [warning] = [line for line in done.stderr.splitlines() if "no worker has taken" in line]
    assert "1 worker(s) answer on redis://127.0.0.1:" in warning
    assert "none consumes the queue 'reference_generator'" in warning
