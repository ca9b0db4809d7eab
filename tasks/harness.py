"""Run real workers and whole jobs on this machine: what the integration tests, the demo's
checks and the benchmarks share. Nothing here is used by a production worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery


class JobTimeout(AssertionError):
    """A job did not end in time (an AssertionError, so tests report it as a failure)."""


def bare_client(redis_url: str) -> Celery:
    """What an upstream stage has: the broker's address and task names, nothing else."""
    app = Celery("upstream", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return app


class WorkerProcess:
    """A ``refgen worker`` in its own process group, so a test can kill the whole worker."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.env, self.log_path = env, log_path
        self.hostname = f"{name}-{uuid.uuid4().hex[:6]}@localhost"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, client: Celery, timeout_s: float = 60) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tasks.cli", "worker", "--hostname", self.hostname],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_path.read_text()[-3000:]}")
            if client.control.ping(destination=[self.hostname], timeout=0.5):
                return self
        raise RuntimeError(f"worker not ready: {self.log_path.read_text()[-3000:]}")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


def stop_process_group(process: subprocess.Popen[Any], timeout_s: float = 20) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and everything it started;
    SIGKILL what is still there after ``timeout_s``."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class JobRun:
    job_id: str
    result: Any
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def of(self, event_type: str, **match: Any) -> list[dict[str, Any]]:
        return [
            d
            for t, d in self.events
            if t == event_type and all(d.get(k) == v for k, v in match.items())
        ]

    @property
    def types(self) -> list[str]:
        return [t for t, _ in self.events]


class JobRunner:
    """Sends a job by name as upstream does, records every event on its channel, and reads
    the result by job id."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.client = bare_client(redis_url)

    def __call__(
        self,
        plan: dict[str, Any],
        duration_seconds: float | None = None,
        job_id: str | None = None,
        timeout_s: float = 60,
    ) -> JobRun:
        job_id = job_id or plan["job_id"]
        listener = redis.Redis.from_url(self.redis_url, decode_responses=True).pubsub(  # type: ignore[no-untyped-call]
            ignore_subscribe_messages=True
        )
        listener.subscribe(f"job_events:{job_id}")
        self.client.send_task(
            "reference_generator.start",
            kwargs={"job_id": job_id, "plan": plan, "duration_seconds": duration_seconds},
        )
        run = JobRun(job_id=job_id, result=None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = listener.get_message(timeout=0.5)
            if message is None:
                continue
            body = json.loads(message["data"])
            run.events.append((body["event_type"], body["data"]))
            if body["event_type"] == "stage_update" and body["data"]["status"] != "started":
                break
        else:
            raise JobTimeout(f"job {job_id} did not finish in {timeout_s} s: {run.types}")
        listener.close()
        run.result = self.client.AsyncResult(job_id).get(timeout=30)
        return run


def base_worker_env(redis_url: str, storage_dir: Path) -> dict[str, str]:
    """The environment of a test worker: nothing inherited that could point it elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REPLICATE_", "SUPABASE_", "LOCAL_", "REFERENCE_", "IMAGE_"))
    }
    env.update(
        REDIS_URL=redis_url,
        LOCAL_STORAGE_DIR=str(storage_dir),
        LOG_FORMAT="json",
        REFERENCE_GEN_CONCURRENCY="4",
    )
    return env
