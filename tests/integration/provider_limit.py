"""The load scenario at the provider's limit (``test_replicate_load.py``): three real workers
share Replicate's budget, scaled down to 120 creates and 300 other requests a minute, through
60 four-image jobs. It takes over two minutes (240 creates at 2 a second), almost all of it
waiting at the limit, so it runs in the background (``conftest.provider_limit``)."""

from __future__ import annotations

import json
import secrets
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.harness import JobRun, JobRunner, WorkerProcess, replicate_worker_env
from tasks.localredis import RedisServer
from tests.fakes.replicate_server import FakeReplicate, PredictionPlan

CREATES_PER_MINUTE = 120
REQUESTS_PER_MINUTE = 300
JOBS = 60
PLAN = Path(__file__).parents[2] / "examples" / "plans" / "typical_2x2.json"


@dataclass
class AtTheLimit:
    """What the run left to check, kept after its servers are gone."""

    statuses: list[str | None] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    throttled: int = 0  # requests the server refused with a 429
    backed_off: int = 0  # shared back-offs the workers logged, one for each 429 they got
    predictions: int = 0  # predictions made (creates the server admitted)
    creates: list[float] = field(default_factory=list)  # create requests, on the fake's clock
    downloads: list[float] = field(default_factory=list)
    other_requests: int = 0


def run_at_the_limit(tmp: Path) -> AtTheLimit:
    outcome = AtTheLimit()
    token = "r8_" + secrets.token_hex(16)
    plan = PredictionPlan(duration=2.0, starting_for=0.3, predict_time=1.7)
    try:
        with (
            RedisServer() as broker,
            FakeReplicate(
                api_token=token,
                default_plan=plan,
                creates_per_minute=CREATES_PER_MINUTE,
                requests_per_minute=REQUESTS_PER_MINUTE,
            ) as replicate,
        ):
            env = replicate_worker_env(broker.url, tmp / "storage", replicate.url, token)
            env.update(
                REPLICATE_CREATES_PER_MINUTE=str(CREATES_PER_MINUTE),
                REPLICATE_REQUESTS_PER_MINUTE=str(REQUESTS_PER_MINUTE),
                REFERENCE_GEN_CONCURRENCY="4",
                LOG_LEVEL="WARNING",
            )
            runner = JobRunner(broker.url)
            workers = [
                WorkerProcess(env, tmp / f"w{i}.log", f"w{i}").start(runner.client)
                for i in range(3)
            ]
            try:
                runs = _run_jobs(runner, outcome, json.loads(PLAN.read_text()))
            finally:
                for worker in workers:
                    worker.stop()
            outcome.statuses = [run.result["status"] if run.result else None for run in runs]
            outcome.throttled = len(replicate.throttled)
            outcome.backed_off = sum(
                worker.log_path.read_text().count('"rate_limit_back_off"') for worker in workers
            )
            outcome.predictions = len(replicate.creates)
            outcome.creates = sorted(r.timestamp for r in replicate.requests_for("create"))
            outcome.downloads = sorted(r.timestamp for r in replicate.requests_for("file"))
            outcome.other_requests = len([r for r in replicate.api_requests if r.route != "create"])
    except Exception:
        outcome.failures.append(traceback.format_exc(limit=6))
    return outcome


def _run_jobs(runner: JobRunner, outcome: AtTheLimit, plan: dict[str, Any]) -> list[JobRun]:
    runs: list[JobRun] = []
    lock = threading.Lock()

    def one() -> None:
        job = {**plan, "job_id": str(uuid.uuid4())}
        try:
            run = runner(job, duration_seconds=180, timeout_s=360)
        except BaseException as exc:
            with lock:
                outcome.failures.append(f"{type(exc).__name__}: {exc}")
            return
        with lock:
            runs.append(run)

    threads = [threading.Thread(target=one) for _ in range(JOBS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs
