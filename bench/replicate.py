"""The Replicate path on the Replicate-like server: a 4-image job whose predictions take 2 s,
then 7 s (SDXL's usual time), enqueue → result, through real workers and, beside it, through
the same ``worker`` code in this process (``Semaphore(4)`` + ``gather``). Figures:

- API requests per image (what Replicate's rate limits count; downloads are not requests);
- job latency ÷ prediction time, for refgen and for the in-process baseline.

The test server answers a held create the moment its prediction ends, as Replicate does.
"""

from __future__ import annotations

import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import cluster, figure, in_process, load_plan, table
from tests.fakes.replicate_server import FakeReplicate, PredictionPlan
from worker.services import Services
from worker.settings import Settings
from worker.storage.local import LocalImageStore

DURATIONS_S = (2.0, 7.0)
ROUNDS = 5
TARGETS = {2.0: 1.03, 7.0: 1.02}
IMAGES = 4


def measure(duration_s: float) -> dict[str, float]:
    token = "r8_" + secrets.token_hex(16)
    plan = PredictionPlan(duration=duration_s, starting_for=0.5, predict_time=duration_s - 0.5)
    baselines, distributed, requests = [], [], []
    with (
        FakeReplicate(api_token=token, default_plan=plan) as fake,
        tempfile.TemporaryDirectory() as tmp,
        cluster(
            GENERATOR_BACKEND="replicate",
            REPLICATE_API_TOKEN=token,
            REPLICATE_BASE_URL=fake.url,
            REFERENCE_GEN_CONCURRENCY="4",
        ) as (runner, _),
    ):
        os.environ["REPLICATE_BASE_URL"] = fake.url  # the client's own variable
        settings = Settings(
            replicate_api_token=token,
            generator_backend="replicate",
            storage_backend="local",
            redis_url=runner.redis_url,
        )
        services = Services.build(settings, store=LocalImageStore(Path(tmp)))
        runner(load_plan(), timeout_s=60)  # warm-up: connections, imports
        in_process(services)
        for _ in range(ROUNDS):  # interleaved, so drift on the machine hits both alike
            baselines.append(in_process(services))
            fake.clear_requests()
            started = time.perf_counter()
            run = runner(load_plan(), timeout_s=60)
            distributed.append(time.perf_counter() - started)
            assert run.result["status"] == "success"
            requests.append(len(fake.api_requests) / IMAGES)
    return {
        "in_process": statistics.median(baselines) / duration_s,
        "distributed": statistics.median(distributed) / duration_s,
        "requests_per_image": max(requests),
    }


def main() -> None:
    rows: list[tuple[str, str]] = []
    for duration in DURATIONS_S:
        figures = measure(duration)
        label = f"{duration:g}s"
        figure(f"replicate_requests_per_image_{label}", figures["requests_per_image"], "requests")
        figure(
            f"replicate_job_latency_ratio_{label}",
            figures["distributed"],
            "x",
            target=TARGETS[duration],
            rounds=ROUNDS,
        )
        figure(f"replicate_job_latency_ratio_in_process_{label}", figures["in_process"], "x")
        rows += [
            (
                f"{duration:g} s predictions: API requests per image",
                f"{figures['requests_per_image']:.2f} (target ≤ 1.1)",
            ),
            (
                f"{duration:g} s predictions: enqueue → result ÷ prediction time",
                f"{figures['distributed']:.3f} × (target ≤ {TARGETS[duration]})",
            ),
            (
                f"{duration:g} s predictions: in-process, same ratio",
                f"{figures['in_process']:.3f} ×",
            ),
        ]
    table(f"Replicate path, 4-image job, median of {ROUNDS}", rows)


if __name__ == "__main__":
    main()
