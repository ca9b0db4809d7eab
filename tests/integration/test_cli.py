"""The `refgen` command as a person runs it: exit codes, progress, broker loss, the demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer, free_port

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
    assert lines[0] == "started: 4 images"
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
    assert "Budget exceeded" in too_poor.stderr


def test_run_says_clearly_when_redis_cannot_be_reached(load_plan, tmp_path) -> None:
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    started = time.monotonic()
    done = refgen("run", str(write(tmp_path, load_plan())), env=env, timeout=30)
    assert done.returncode == 3
    assert "cannot reach Redis at redis://127.0.0.1:" in done.stderr
    assert time.monotonic() - started < 20


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
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "tasks.cli", "run", str(write(tmp_path, load_plan()))],
                env={**env, "BROKER_GRACE_S": "3"},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(3)  # the job is running
            broker.stop()
            _, stderr = process.communicate(timeout=60)
        finally:
            worker.stop()
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
