"""``refgen demo``: a sample plan end to end on the local backends.

Uses the Redis and the worker it finds; starts what is missing and stops what it started.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tasks.client import RunRequest, run
from tasks.localredis import RedisServer, reachable
from worker import constants as c
from worker.settings import get_settings

_SAMPLE = Path("examples") / "plans" / "typical_2x2.json"
# Beside the sources in a checkout; in the working directory where the package is installed
# (the Docker image keeps examples/ in /app).
DEFAULT_PLAN = next(
    (
        p
        for p in (Path(__file__).resolve().parents[1] / _SAMPLE, Path.cwd() / _SAMPLE)
        if p.exists()
    ),
    Path(__file__).resolve().parents[1] / _SAMPLE,
)
_LOG_DIR = Path(".refgen")


def demo(plan: Path = DEFAULT_PLAN, duration_seconds: float = 180.0) -> int:
    with contextlib.ExitStack() as stack:
        redis_url = os.environ.get("REDIS_URL", get_settings().redis_url)
        if not reachable(redis_url):
            server = stack.enter_context(RedisServer())
            redis_url = server.url
            _say(f"started redis-server on port {server.port}")
        else:
            _say(f"using the Redis at {redis_url.rsplit('@', 1)[-1]}")
        os.environ["REDIS_URL"] = redis_url
        get_settings.cache_clear()
        settings = get_settings()
        if _worker_running():
            _say("using the refgen worker already running")
        else:
            stack.enter_context(_local_worker())
        return run(
            RunRequest(plan_path=plan, duration_seconds=duration_seconds, job_id=str(uuid.uuid4())),
            settings,
        )
    return 1  # unreachable; keeps type checkers calm about ExitStack swallowing


def _say(message: str) -> None:
    print(f"refgen demo: {message}", file=sys.stderr, flush=True)


def _worker_running() -> bool:
    from tasks.app import app

    replies = app.control.inspect(timeout=1.0).registered() or {}
    return any(c.TASK_START in names for names in replies.values())


@contextlib.contextmanager
def _local_worker() -> Iterator[None]:
    _LOG_DIR.mkdir(exist_ok=True)
    log_path = _LOG_DIR / "demo-worker.log"
    env = {**os.environ, "GENERATOR_BACKEND": "local", "STORAGE_BACKEND": "local"}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "worker", "--hostname", f"demo-{os.getpid()}@%h"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not _worker_running():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {log_path}")
            time.sleep(0.5)
        _say(f"started a worker (pid {process.pid}, log {log_path})")
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _say("stopped the worker")
