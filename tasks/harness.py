"""Run real workers and whole jobs on this machine: what the integration tests, the demo's
checks and the benchmarks share. Nothing here is used by a production worker."""

from __future__ import annotations

import contextlib
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


def bare_client(
    redis_url: str, *, sentinel_master: str | None = None, sentinel_password: str | None = None
) -> Celery:
    """What an upstream stage has: the broker's address and task names, nothing else. With
    ``sentinel_master``, ``redis_url`` lists the Sentinels
    (``sentinel://host:port;sentinel://host:port``), as in the README's upstream contract,
    and ``sentinel_password`` is the Sentinels' own."""
    app = Celery("upstream", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    if sentinel_master is not None:
        options: dict[str, Any] = {"master_name": sentinel_master}
        if sentinel_password is not None:
            options["sentinel_kwargs"] = {"password": sentinel_password}
        app.conf.broker_transport_options = options
        app.conf.result_backend_transport_options = options
        # The first read after a failover can find the Sentinels' connections stale.
        app.conf.result_backend_always_retry = True
    return app


class WorkerProcess:
    """A ``refgen worker`` in its own process group, so a test can kill the whole worker."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        name: str,
        module: str = "tasks.cli",
        *,
        command: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.env, self.log_path, self.module = env, log_path, module
        # Another installation's `refgen` (an installed wheel's, run from outside the tree).
        self.command = command or [sys.executable, "-m", module]
        self.cwd = cwd
        self.hostname = f"{name}-{uuid.uuid4().hex[:6]}@localhost"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, client: Celery, timeout_s: float = 60) -> WorkerProcess:
        """Until the worker answers a ping; when it never does, it is stopped, not left."""
        try:
            return self._start(client, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, client: Celery, timeout_s: float) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.command, "worker", "--hostname", self.hostname],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_path.read_text()[-3000:]}")
            try:
                if client.control.ping(destination=[self.hostname], timeout=0.5):
                    return self
            except (redis.RedisError, OSError) as exc:
                # The client's pooled connection went stale: the next ping makes a new one.
                last_error = exc
                time.sleep(0.1)
        raise RuntimeError(
            f"worker not ready (last ping error: {last_error!r}): "
            f"{self.log_path.read_text()[-3000:]}"
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


def stop_process_group(process: subprocess.Popen[Any], timeout_s: float = 20) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and everything it started;
    SIGKILL what is still there after ``timeout_s`` (or once the leader is gone: a pool
    process it left behind)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):
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
        if not k.startswith(
            (
                "REDIS_",
                "REFGEN_",
                "REPLICATE_",
                "SUPABASE_",
                "LOCAL_",
                "REFERENCE_",
                "IMAGE_",
                "OTEL_",
            )
        )
    }
    env.update(
        REDIS_URL=redis_url,
        LOCAL_STORAGE_DIR=str(storage_dir),
        LOG_FORMAT="json",
        REFERENCE_GEN_CONCURRENCY="4",
    )
    return env


def local_worker_env(redis_url: str, storage_dir: Path, latency_s: float = 0.2) -> dict[str, str]:
    """A test worker on the local generator and store, ``latency_s`` an image."""
    env = base_worker_env(redis_url, storage_dir)
    env.update(
        GENERATOR_BACKEND="local",
        STORAGE_BACKEND="local",
        LOCAL_GENERATOR_LATENCY_S=f"{latency_s:g}",
    )
    return env


def replicate_worker_env(
    redis_url: str, storage_dir: Path, replicate_url: str, token: str
) -> dict[str, str]:
    """A test worker on the Replicate path, against a Replicate-like server at
    ``replicate_url``, storing images locally."""
    env = base_worker_env(redis_url, storage_dir)
    env.update(
        REPLICATE_API_TOKEN=token,
        REPLICATE_BASE_URL=replicate_url,
        GENERATOR_BACKEND="replicate",
        STORAGE_BACKEND="local",
    )
    return env


class JobFeeder:
    """Keeps ``in_flight`` jobs of one plan queued, each under a fresh job id, and reads their
    results straight from the result keys: a poll, never a subscription, so the feeder leaves
    no channel of its own on the server (a bare client's ``send_task`` and ``get`` do)."""

    def __init__(self, redis_url: str, plan: dict[str, Any], in_flight: int = 8) -> None:
        self.client = bare_client(redis_url)
        self.redis = redis.Redis.from_url(redis_url)
        self.plan, self.in_flight = plan, in_flight
        self.pending: set[str] = set()
        self.results: dict[str, Any] = {}  # job id → its result (None for a null result)
        self.failed: dict[str, Any] = {}  # job id → the meta of a job whose finalize failed

    @property
    def done(self) -> int:
        return len(self.results) + len(self.failed)

    def send(self) -> str:
        job_id = str(uuid.uuid4())
        # ignore_result: start stores no result, and sending without it subscribes this
        # client to the channel of a result that never comes.
        self.client.send_task(
            "reference_generator.start",
            kwargs={"job_id": job_id, "plan": {**self.plan, "job_id": job_id}},
            ignore_result=True,
        )
        self.pending.add(job_id)
        return job_id

    def run(self, until: int, timeout_s: float = 600) -> None:
        """Send jobs until ``until`` have been sent in all, and wait until every one has ended."""
        deadline = time.monotonic() + timeout_s
        while self.done < until:
            while len(self.pending) < self.in_flight and self.done + len(self.pending) < until:
                self.send()
            if not self.collect():
                if time.monotonic() > deadline:
                    raise JobTimeout(f"{len(self.pending)} jobs unfinished after {timeout_s} s")
                time.sleep(0.01)

    def collect(self) -> int:
        """Record the jobs that have ended; how many did."""
        ids = sorted(self.pending)
        if not ids:
            return 0
        metas = self.redis.mget([f"celery-task-meta-{job_id}" for job_id in ids])
        for job_id, raw in zip(ids, metas, strict=True):
            if raw is None:
                continue
            meta = json.loads(raw)
            if meta.get("status") == "SUCCESS":
                self.results[job_id] = meta.get("result")
            else:
                self.failed[job_id] = meta
            self.pending.discard(job_id)
        return len(ids) - len(self.pending)
