"""Shared by the benchmark scripts: a private Redis, real workers, figures printed as a table
and as one JSON line each (``{"figure": ..., "value": ..., "unit": ...}``)."""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer

# The in-process baseline runs worker code here: keep its info lines out of the figures.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "examples" / "plans"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def figure(name: str, value: float, unit: str, **context: object) -> dict[str, object]:
    line = {"figure": name, "value": round(value, 4), "unit": unit, **context}
    print(json.dumps(line), flush=True)
    return line


def table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}  ({machine()})")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    print(flush=True)


@contextmanager
def cluster(
    workers: int = 1, **env_overrides: str
) -> Iterator[tuple[JobRunner, list[WorkerProcess]]]:
    """A private redis-server and ``workers`` real ``refgen worker`` processes on the local
    backends, stopped and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="refgen-bench-") as tmp, RedisServer() as broker:
        env = base_worker_env(broker.url, Path(tmp) / "storage")
        env.update(GENERATOR_BACKEND="local", STORAGE_BACKEND="local", LOG_LEVEL="WARNING")
        env.update(env_overrides)
        runner = JobRunner(broker.url)
        started = [
            WorkerProcess(env, Path(tmp) / f"w{i}.log", f"bench{i}").start(runner.client)
            for i in range(workers)
        ]
        try:
            yield runner, started
        finally:
            for worker in started:
                worker.stop()


def load_plan(name: str = "typical_2x2") -> dict[str, object]:
    plan: dict[str, object] = json.loads((PLANS / f"{name}.json").read_text())
    plan["job_id"] = str(uuid.uuid4())
    return plan
