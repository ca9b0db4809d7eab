"""The chord leak with nothing of refgen in it: a plain Celery app whose task launches a chord
of four tasks, on a threads worker, with Celery's Redis result backend and then with
``tasks.backend.PollingRedisBackend``.

With Celery's backend every launch leaves its four header results registered as pending
results in the worker and their ``celery-task-meta-*`` channels subscribed on the server, for
good. ``python -m bench.plain_chord [--jobs N]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery, chord
from celery.backends.redis import RedisBackend
from celery.worker.control import inspect_command

from bench.common import figure, table
from tasks.harness import stop_process_group
from tasks.localredis import RedisServer
from worker.retirement import memory_kb

BACKENDS = {
    "celery": "{url}",
    "polling": "tasks.backend:PollingRedisBackend+{url}",
}

app = Celery(
    "plain",
    broker=os.environ.get("PLAIN_URL", "redis://127.0.0.1:6379/0"),
    backend=BACKENDS[os.environ.get("PLAIN_BACKEND", "celery")].format(
        url=os.environ.get("PLAIN_URL", "redis://127.0.0.1:6379/0")
    ),
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="plain.part")
def part(i: int) -> int:
    return i


@app.task(name="plain.total")
def total(results: list[int]) -> int:
    return sum(results)


@app.task(name="plain.launch", ignore_result=True)
def launch() -> None:
    chord([part.s(i) for i in range(4)])(total.s())


@inspect_command()
def results_held(state: Any) -> dict[str, int]:
    """Pending results and subscriptions in every backend of this worker (one per thread)."""
    held = {"pending_results": 0, "subscribed": 0}
    for backend in [o for o in gc.get_objects() if isinstance(o, RedisBackend)]:
        concrete, weak = getattr(backend, "_pending_results", ({}, {}))
        held["pending_results"] += sum(len(w) for w in concrete.values())
        held["pending_results"] += sum(len(w) for w in weak.values())
        held["subscribed"] += len(getattr(backend.result_consumer, "subscribed_to", ()))
    return held


def run(backend: str, jobs: int) -> dict[str, float]:
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PLAIN_URL": server.url, "PLAIN_BACKEND": backend}
        log = (Path(tmp) / "worker.log").open("wb")
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "bench.plain_chord", "worker"),
                *("-P", "threads", "-c", "8", "-l", "WARNING", "-n", f"plain-{backend}@localhost"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = Celery(broker=server.url, backend=server.url)
        observer = redis.Redis.from_url(server.url)
        try:
            deadline = time.monotonic() + 60
            while not client.control.ping(timeout=0.5):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start: {log.name}")
            samples, sent = [], 0
            for checkpoint in (jobs // 4, jobs):  # after warm-up, and at the end
                while sent < checkpoint:
                    client.send_task("plain.launch", ignore_result=True)
                    sent += 1
                # Four parts and a total a job, each with its result key.
                deadline = time.monotonic() + 600
                while sum(1 for _ in observer.scan_iter("celery-task-meta-*", 1000)) < sent * 5:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"jobs unfinished after 600 s: {log.name}")
                    time.sleep(0.2)
                time.sleep(0.5)
                samples.append(memory_kb(worker.pid).pss / 1024)
            replies = client.control.broadcast("results_held", reply=True, timeout=5)
            held = next(iter(replies[0].values()))
            channels = len(observer.pubsub_channels("celery-task-meta-*"))
        finally:
            stop_process_group(worker)
            log.close()
    growth_kb = (samples[1] - samples[0]) * 1024 / (jobs - jobs // 4)
    return {
        "channels": channels,
        "pending_results": held["pending_results"],
        "pss_first": samples[0],
        "pss_last": samples[1],
        "growth_kb_per_job": growth_kb,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plain_chord", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args(argv)
    rows = []
    for backend in BACKENDS:
        found = run(backend, args.jobs)
        for name, value in found.items():
            unit = {"channels": "channels", "pending_results": "results"}.get(name, "MB")
            unit = "KB" if name.endswith("_kb_per_job") else unit
            figure(f"plain_chord_{name}", value, unit, backend=backend, jobs=args.jobs)
        rows.append(
            (
                f"{backend} backend",
                f"{found['channels']:5.0f} channels  {found['pending_results']:5.0f} pending"
                f"  PSS {found['pss_first']:.1f} → {found['pss_last']:.1f} MB"
                f"  ({found['growth_kb_per_job']:+.2f} KB a job)",
            )
        )
    table(f"A plain Celery app launching a chord of 4 from a task, {args.jobs} times", rows)


if __name__ == "__main__":
    main()
