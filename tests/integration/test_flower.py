"""Flower watching a real worker: what docker-compose.yml's flower service promises.

Flower learns workers and tasks from the worker's events (``worker_send_task_events``; the
task-sent event is off, so a task first appears when a worker receives it). Flower 2.2's HTTP
API answers only with authentication configured, or with ``FLOWER_UNAUTHENTICATED_API=true``,
which these tests set on a Flower bound to 127.0.0.1 and which compose never sets. The other
test holds Flower to its auth as compose configures it: basic auth from ``FLOWER_BASIC_AUTH``,
closed to everyone when that is empty, and ``/healthcheck`` open for the container healthcheck.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer, free_port
from worker.planning import plan_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]

START = "reference_generator.start"
GENERATE = "reference_generator.generate_reference"
FINALIZE = "reference_generator.finalize"


class Flower:
    """``celery -A tasks.app flower`` on a free loopback port, in its own process group."""

    def __init__(
        self,
        redis_url: str,
        env: dict[str, str],
        log_path: Path,
        *,
        refgen: bool = False,
        cwd: Path = ROOT,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # `refgen flower` (what compose runs) reads REDIS_URL; celery's is given --broker.
        command = (
            ["tasks.cli", "flower"]
            if refgen
            else ["celery", "-A", "tasks.app", "--broker", redis_url, "flower"]
        )
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    *command,
                    # Tornado's options: --name=value only ("--port 5555" is refused).
                    f"--port={self.port}",
                    "--address=127.0.0.1",
                ],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 30) -> Flower:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower exited: {self.log_path.read_text()[-3000:]}")
            try:
                if self.get("/healthcheck") == (200, b"OK"):
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"flower not ready: {self.log_path.read_text()[-3000:]}")

    def get(
        self,
        path: str,
        auth: str | None = None,
        *,
        header: str | None = None,
        method: str = "GET",
    ) -> tuple[int, bytes]:
        """``auth`` is user:password, base64-encoded here; ``header`` a raw Authorization."""
        body = b"{}" if method == "POST" else None
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if auth is not None:
            token = base64.b64encode(auth.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        if header is not None:
            request.add_header("Authorization", header)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def api(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def env(broker: RedisServer, tmp_path: Path) -> dict[str, str]:
    environment = {
        k: v
        for k, v in base_worker_env(broker.url, tmp_path / "storage").items()
        if not k.startswith("FLOWER_")
    }
    environment.update(
        GENERATOR_BACKEND="local", STORAGE_BACKEND="local", LOCAL_GENERATOR_LATENCY_S="0.2"
    )
    return environment


@pytest.fixture
def start_flower(
    broker: RedisServer, env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., Flower]]:
    started: list[Flower] = []

    def start(refgen: bool = False, cwd: Path = ROOT, **flower_env: str) -> Flower:
        log = tmp_path / f"flower{len(started)}.log"
        flower = Flower(broker.url, {**env, **flower_env}, log, refgen=refgen, cwd=cwd)
        started.append(flower)
        return flower.wait_ready()

    yield start
    for flower in started:
        flower.stop()


@pytest.fixture
def runner(broker: RedisServer) -> JobRunner:
    return JobRunner(broker.url)


@pytest.fixture
def worker(env: dict[str, str], runner: JobRunner, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(env, tmp_path / "worker.log", "flower-watched")
    try:
        yield process
    finally:
        process.stop()


def poll(check: Callable[[], Any], timeout_s: float = 30, what: str = "") -> Any:
    """check() until it returns something truthy; its last answer goes into the failure."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"{what} not seen in Flower within {timeout_s} s; last: {last!r}")


def test_flower_shows_the_worker_and_every_task_of_a_job(
    start_flower, worker: WorkerProcess, runner: JobRunner, load_plan
) -> None:
    flower = start_flower(FLOWER_UNAUTHENTICATED_API="true")
    worker.start(runner.client)
    plan = load_plan("typical_2x2")
    job_id = plan["job_id"]
    run = runner(plan, timeout_s=60)
    assert run.result["status"] == "success"

    # The worker, by its hostname: inspected (refresh=1) and alive by its heartbeats (status=1).
    workers = poll(
        lambda: (found := flower.api("/api/workers?refresh=1")).get(worker.hostname) and found,
        what=f"worker {worker.hostname}",
    )
    assert set(workers) == {worker.hostname}
    info = workers[worker.hostname]
    assert {START, GENERATE, FINALIZE} <= set(info["registered"])
    assert {q["name"] for q in info["active_queues"]} >= {"reference_generator"}
    alive = poll(
        lambda: flower.api("/api/workers?status=1").get(worker.hostname),
        what="the worker alive",
    )
    assert alive is True

    # The job's tasks, each succeeded on that worker.
    expected = Counter({START: 1, GENERATE: 4, FINALIZE: 1})

    def job_tasks() -> dict[str, dict[str, Any]] | None:
        tasks = flower.api("/api/tasks")
        done = Counter(t["name"] for t in tasks.values() if t["state"] == "SUCCESS")
        return tasks if done == expected else None

    tasks = poll(job_tasks, what="the job's six tasks in SUCCESS")
    assert len(tasks) == 6
    assert all(t["worker"] == worker.hostname for t in tasks.values())
    by_name: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for task_id, task in tasks.items():
        assert task["uuid"] == task_id
        assert task["received"] and task["succeeded"] and task["runtime"] is not None
        by_name.setdefault(task["name"], []).append((task_id, task))
    # Ids tie them to the job: header tasks are "{job}:{image}", the callback is the job id.
    assert [task_id for task_id, _ in by_name[FINALIZE]] == [job_id]
    assert all(task_id.startswith(f"{job_id}:") for task_id, _ in by_name[GENERATE])
    assert job_id in by_name[START][0][1]["kwargs"]
    # The messages refgen sends show what they are, not their specs: no prompt in Flower.
    for task_id, task in by_name[GENERATE]:
        key = task_id.removeprefix(f"{job_id}:")
        assert (task["args"], task["kwargs"]) == (f"(<{key} of job {job_id}>,)", "{}")
    assert by_name[FINALIZE][0][1]["args"] == f"(<outcomes>, {job_id!r})"
    shown = " ".join(f"{t['args']} {t['kwargs']}" for _, t in by_name[GENERATE] + by_name[FINALIZE])
    specs = plan_job(job_id, plan, None, max_images=50, per_minute=Decimal(200)).images
    assert len(specs) == 4 and not [s.prompt for s in specs if s.prompt[:30] in shown]

    # Filters work as the UI uses them.
    assert set(flower.api(f"/api/tasks?taskname={GENERATE}")) == {t for t, _ in by_name[GENERATE]}
    assert set(flower.api("/api/task/types")["task-types"]) == {START, GENERATE, FINALIZE}


def test_flower_shows_a_failed_image_as_failure_with_its_reason_and_a_retry_as_retry(
    start_flower, worker: WorkerProcess, runner: JobRunner, load_plan
) -> None:
    """The rooftop fails both attempts, the antagonist its first: the job ends partial, and
    Flower, from the worker's own events, shows the rooftop's task as FAILURE with the reason
    the job's events give, both as retried, and every other task as SUCCESS."""
    flower = start_flower(FLOWER_UNAUTHENTICATED_API="true")
    worker.env.update(LOCAL_GENERATOR_FAIL_IDS="rooftop", LOCAL_GENERATOR_FLAKY_IDS="antagonist")
    worker.start(runner.client)
    plan = load_plan("typical_2x2")
    job_id = plan["job_id"]
    run = runner(plan, timeout_s=60)
    assert run.result["status"] == "partial"
    (failed,) = run.of("reference_generation_failed")
    assert failed["image_id"] == "rooftop"

    rooftop, antagonist = f"{job_id}:scene_rooftop", f"{job_id}:character_antagonist"
    expected = {START: 1, GENERATE: 4, FINALIZE: 1}

    def settled() -> dict[str, dict[str, Any]] | None:
        tasks = flower.api("/api/tasks")
        ended = Counter(t["name"] for t in tasks.values() if t["state"] in ("SUCCESS", "FAILURE"))
        return tasks if ended == expected else None

    tasks = poll(settled, what="the job's six tasks ended")
    states = {task_id: task["state"] for task_id, task in tasks.items()}
    assert states.pop(rooftop) == "FAILURE"
    assert set(states.values()) == {"SUCCESS"}
    info = flower.api(f"/api/task/info/{rooftop}")
    assert info["exception"] == f"ImageNotMade({failed['reason']!r})"
    # Retried before it failed, and the retry's reason is what Flower showed in RETRY.
    assert info["retried"] is not None and info["retries"] == 1
    flaky = flower.api(f"/api/task/info/{antagonist}")
    assert flaky["state"] == "SUCCESS" and flaky["retried"] is not None
    assert flaky["args"] == f"(<character_antagonist of job {job_id}>,)"  # the retry's too
    assert "RetryableError('The image service is temporarily unavailable" in flaky["exception"]
    assert "Traceback" not in worker.log_path.read_text()  # an expected failure, one line


@pytest.mark.parametrize(
    ("flower_env", "credentials", "api_status"),
    [
        pytest.param({"FLOWER_BASIC_AUTH": "ops:test-only-pw"}, None, 401, id="basic-no-creds"),
        pytest.param({"FLOWER_BASIC_AUTH": "ops:test-only-pw"}, "ops:wrong", 401, id="basic-bad"),
        pytest.param(
            {"FLOWER_BASIC_AUTH": "ops:test-only-pw"}, "ops:test-only-pw", 200, id="basic-good"
        ),
        # compose's ${FLOWER_BASIC_AUTH:-} with nothing set on the host: closed to everyone.
        pytest.param({"FLOWER_BASIC_AUTH": ""}, ":", 401, id="empty-fails-closed"),
        # No auth at all and no FLOWER_UNAUTHENTICATED_API: the API refuses.
        pytest.param({}, None, 401, id="no-auth-api-closed"),
    ],
)
def test_flower_auth_is_what_compose_relies_on(
    start_flower, flower_env: dict[str, str], credentials: str | None, api_status: int
) -> None:
    flower = start_flower(FLOWER_UNAUTHENTICATED_API="false", **flower_env)
    status, body = flower.get("/api/workers", auth=credentials)
    assert status == api_status, body[:300]
    if flower_env.get("FLOWER_BASIC_AUTH") is not None:
        assert flower.get("/", auth=credentials)[0] == api_status
    # The compose healthcheck needs no credentials, whatever the auth.
    assert flower.get("/healthcheck") == (200, b"OK")


def test_refgen_flower_refuses_to_start_without_real_credentials(env: dict[str, str]) -> None:
    """compose's FLOWER_BASIC_AUTH left unset (Compose passes it empty) made Flower take one
    empty credential, which `Basic !` matched: `refgen flower` does not start at all."""
    for value in ("", ":", "ops:", ":pw", "ops:pw,", "ops:pw, :", "ops"):
        done = subprocess.run(
            [sys.executable, "-m", "tasks.cli", "flower", f"--port={free_port()}"],
            env={**env, "FLOWER_BASIC_AUTH": value},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 5, (value, done.stderr[-500:])
        (line,) = done.stderr.strip().splitlines()
        assert "FLOWER_BASIC_AUTH" in line and "Traceback" not in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "flower", "--basic_auth=ops:pw"],
        env={k: v for k, v in env.items() if k != "FLOWER_BASIC_AUTH"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 5 and "not --basic_auth" in done.stderr
    # However spelt: Tornado strips the dashes and reads _ as -. A config file could set
    # basic_auth too.
    for arg in (
        "-basic_auth=x:",
        "---basic-auth=x:",
        "-auth=x",
        "-unauthenticated_api",
        "--conf=c.py",
    ):
        done = subprocess.run(
            [sys.executable, "-m", "tasks.cli", "flower", f"--port={free_port()}", arg],
            env={**env, "FLOWER_BASIC_AUTH": "ops:pw"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 5 and "takes its credentials" in done.stderr, (arg, done.stderr)


def test_refgen_flower_lets_nobody_in_without_the_password(start_flower, tmp_path: Path) -> None:
    """The attacks, against a real Flower as compose starts it: none gets past 401, not even
    on the API that starts a (paid) job, nor on Flower's own /metrics; and a flowerconfig.py
    in its working directory (Flower reads one by default) cannot open it again."""
    (tmp_path / "flowerconfig.py").write_text("basic_auth = ['']\n")
    flower = start_flower(
        refgen=True,
        cwd=tmp_path,
        FLOWER_BASIC_AUTH="ops:test-only-pw",
        FLOWER_FAILED_LOGINS_PER_MINUTE="100",  # every attack answered 401, none throttled
    )
    attacks = {
        "no header": None,
        "empty credential": "Basic Og==",  # ":"
        "decodes to nothing": "Basic !",
        "padding only": "Basic ====",
        "user, empty password": "Basic " + base64.b64encode(b"ops:").decode(),
        "wrong password": "Basic " + base64.b64encode(b"ops:wrong").decode(),
    }
    for what, header in attacks.items():
        for method, path in (
            ("GET", "/"),
            ("GET", "/api/workers"),
            ("GET", "/metrics"),
            ("POST", f"/api/task/async-apply/{START}"),
        ):
            status, body = flower.get(path, header=header, method=method)
            assert status == 401, (what, method, path, status, body[:200])
    assert flower.get("/api/workers", auth="ops:test-only-pw")[0] == 200
    status, body = flower.get("/metrics", auth="ops:test-only-pw")
    assert status == 200 and b"flower_" in body
    assert flower.get("/healthcheck") == (200, b"OK")
    log = flower.log_path.read_text()
    assert "test-only-pw" not in log
    # LOG_FORMAT=json (the harness's), as for every other process: one JSON object a line.
    lines = [json.loads(line) for line in log.splitlines()]
    assert any(line["logger"] == "flower.command" for line in lines)


def answer(flower: Flower, auth: str, source: str = "127.0.0.1") -> http.client.HTTPResponse:
    """A GET of Flower's API as user:password, sent from the loopback address ``source``."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", flower.port, timeout=10, source_address=(source, 0)
    )
    token = base64.b64encode(auth.encode()).decode()
    connection.request("GET", "/api/workers", headers={"Authorization": f"Basic {token}"})
    reply = connection.getresponse()
    reply.read()
    connection.close()
    return reply


def test_refgen_flower_stops_a_client_guessing_passwords(start_flower) -> None:
    """Past its wrong passwords for the minute, a client address is answered 429 whatever it
    sends, the right password included; another address is not; no page may be framed."""
    flower = start_flower(
        refgen=True, FLOWER_BASIC_AUTH="ops:test-only-pw", FLOWER_FAILED_LOGINS_PER_MINUTE="3"
    )
    assert answer(flower, "ops:test-only-pw").status == 200  # a right one counts nothing
    for guess in ("ops:a", "ops:é", "ops:c"):  # one not ASCII: a 401 too, and counted
        assert answer(flower, guess).status == 401
    stopped = answer(flower, "ops:test-only-pw")
    assert stopped.status == 429
    assert 1 <= int(stopped.headers["Retry-After"]) <= 60
    assert answer(flower, "ops:d").status == 429  # and no more guesses are looked at
    other = answer(flower, "ops:test-only-pw", source="127.0.0.2")
    assert other.status == 200
    assert other.headers["X-Frame-Options"] == "DENY"
    assert other.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert stopped.headers["X-Frame-Options"] == "DENY"

    # Whom it stopped, once, for operators to find; never a password.
    def stops() -> list[tuple[str, int]]:
        lines = [json.loads(line) for line in flower.log_path.read_text().splitlines()]
        return [
            (line["client"], line["wrong_passwords"])
            for line in lines
            if line.get("event") == "flower_client_stopped"
        ]

    assert poll(stops, what="the stop's log line") == [("127.0.0.1", 3)]
    assert "test-only-pw" not in flower.log_path.read_text()
