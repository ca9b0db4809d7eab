"""Shared by the benchmark scripts: a private Redis, real workers, figures printed as a table
and as one JSON line each (``{"figure": ..., "value": ..., "unit": ...}``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer
from worker.jobs import Recorded
from worker.lifecycle import JobFinalizer, JobIntake, Launch
from worker.models import ImageSpec
from worker.pipeline import ImagePipeline, Step
from worker.services import Services

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


def in_process(services: Services) -> float:
    """Seconds for a whole job in this process, through the same ``worker`` code with
    ``asyncio.Semaphore(4)`` and ``gather`` instead of a chord: what remains of refgen without
    Celery (the benchmarks' baseline)."""
    return asyncio.run(_in_process(services))


async def _in_process(services: Services) -> float:
    limit = asyncio.Semaphore(4)
    plan = load_plan()
    started = time.perf_counter()
    admission = JobIntake(services).admit(plan["job_id"], plan, None, task_id="in-process")
    assert isinstance(admission, Launch)
    pipeline = ImagePipeline(services)

    async def one(spec: ImageSpec) -> Step:
        async with limit:
            return await asyncio.to_thread(pipeline.run, spec, 0)

    outcomes = await asyncio.gather(*(one(spec) for spec in admission.plan.images))
    made = [o.outcome for o in outcomes if isinstance(o, Recorded)]
    result = JobFinalizer(services).finalize(str(plan["job_id"]), made)
    assert result is not None and result["status"] == "success"
    return time.perf_counter() - started
