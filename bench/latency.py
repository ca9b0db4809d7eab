"""Job latency: a 4-image job at 2 s per image, enqueue → result, against

(a) the ideal: one image's time plus its upload, measured in this process, and
(b) the in-process baseline: the original single-process design doing the same work (plan
    checks, budget, generation, upload, cost ledger, events, threshold) through the same
    ``worker`` code, with ``asyncio.Semaphore(4)`` and ``gather`` instead of a chord,

all in the same run, so the ratios compare like with like on a shared, noisy machine.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.common import cluster, figure, in_process, load_plan, table
from worker.generation import GenerationRequest
from worker.generation.local import LocalImageGenerator
from worker.pipeline import generation_request
from worker.planning import plan_job
from worker.services import Services
from worker.settings import Settings
from worker.storage.local import LocalImageStore

LATENCY_S = 2.0
ROUNDS = 5


def requests() -> list[GenerationRequest]:
    plan = load_plan("typical_2x2")
    settings = Settings(generator_backend="local", storage_backend="local")
    job = plan_job(
        str(plan["job_id"]), plan, None, max_images=50, per_minute=settings.budget_per_video_minute
    )
    return [generation_request(spec, 0, settings.image_timeout_s) for spec in job.images]


def make_and_store(
    generator: LocalImageGenerator, store: LocalImageStore, request: GenerationRequest
) -> str:
    image = generator.generate(request)
    path = f"{request.job_id}/{request.image_key}.png"
    store.put_png(path, image.png)
    return store.signed_url(path)


def ideal(store: LocalImageStore) -> float:
    generator = LocalImageGenerator(latency_s=LATENCY_S)
    started = time.perf_counter()
    make_and_store(generator, store, requests()[0])
    return time.perf_counter() - started


def main() -> None:
    ideals, baselines, distributed = [], [], []
    with (
        tempfile.TemporaryDirectory() as tmp,
        cluster(LOCAL_GENERATOR_LATENCY_S=str(LATENCY_S), REFERENCE_GEN_CONCURRENCY="4") as (
            runner,
            _,
        ),
    ):
        store = LocalImageStore(Path(tmp))
        settings = Settings(
            generator_backend="local", storage_backend="local", redis_url=runner.redis_url
        )
        services = Services.build(
            settings, store=store, generator=LocalImageGenerator(latency_s=LATENCY_S)
        )
        runner(load_plan(), timeout_s=60)  # warm-up: connections, imports, first render
        for _ in range(ROUNDS):  # interleaved, so drift on the machine hits all three alike
            ideals.append(ideal(store))
            baselines.append(in_process(services))
            started = time.perf_counter()
            run = runner(load_plan(), timeout_s=60)
            distributed.append(time.perf_counter() - started)
            assert run.result["status"] == "success"
    best = {"ideal": min(ideals), "in_process": min(baselines), "distributed": min(distributed)}
    median = {
        "ideal": statistics.median(ideals),
        "in_process": statistics.median(baselines),
        "distributed": statistics.median(distributed),
    }
    for name in best:
        figure(f"job_latency_{name}", median[name], "s", best=round(best[name], 4), rounds=ROUNDS)
    vs_baseline = median["distributed"] / median["in_process"]
    vs_ideal = median["distributed"] / median["ideal"]
    figure("job_latency_ratio_vs_in_process", vs_baseline, "x", target=1.02)
    figure("job_latency_ratio_vs_ideal", vs_ideal, "x", target=1.04)
    table(
        f"Job latency, 4 images at {LATENCY_S:g} s each, median of {ROUNDS}",
        [
            ("ideal (one image + upload)", f"{median['ideal']:.3f} s"),
            ("in-process (same work, Semaphore(4) + gather)", f"{median['in_process']:.3f} s"),
            ("refgen (enqueue → result)", f"{median['distributed']:.3f} s"),
            ("ratio to in-process", f"{vs_baseline:.3f} × (target ≤ 1.02)"),
            ("ratio to ideal", f"{vs_ideal:.3f} × (target ≤ 1.04)"),
        ],
    )


if __name__ == "__main__":
    main()
