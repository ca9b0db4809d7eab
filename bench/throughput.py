"""Throughput: 100 jobs × 4 images at 0.5 s per image on W workers × C slots.

Efficiency = images per second achieved ÷ (W × C / 0.5), the most the slots could do.
"""

from __future__ import annotations

import time

from bench.common import cluster, figure, load_plan, table

JOBS, LATENCY_S, SLOTS = 100, 0.5, 4


def measure(workers: int) -> tuple[float, float]:
    with cluster(
        workers=workers,
        LOCAL_GENERATOR_LATENCY_S=str(LATENCY_S),
        REFERENCE_GEN_CONCURRENCY=str(SLOTS),
    ) as (runner, _):
        runner(load_plan(), timeout_s=60)  # warm-up
        plans = [load_plan() for _ in range(JOBS)]
        started = time.perf_counter()
        for plan in plans:
            runner.client.send_task(
                "reference_generator.start", kwargs={"job_id": plan["job_id"], "plan": plan}
            )
        for plan in plans:
            result = runner.client.AsyncResult(plan["job_id"]).get(timeout=600)
            assert result["status"] == "success"
        elapsed = time.perf_counter() - started
    rate = JOBS * 4 / elapsed
    return rate, rate / (workers * SLOTS / LATENCY_S)


def main() -> None:
    rows = []
    for workers in (1, 2):
        rate, efficiency = measure(workers)
        figure("throughput_images_per_s", rate, "images/s", workers=workers, slots=SLOTS)
        figure(
            "throughput_efficiency", efficiency * 100, "%", workers=workers, slots=SLOTS, target=95
        )
        rows.append(
            (
                f"{workers} worker(s) × {SLOTS} slots",
                f"{rate:5.2f} images/s = {efficiency:.1%} of {workers * SLOTS / LATENCY_S:g}",
            )
        )
    table(f"Throughput, {JOBS} jobs × 4 images at {LATENCY_S:g} s each", rows)


if __name__ == "__main__":
    main()
