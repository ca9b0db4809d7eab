"""Dollars per job for the sample plans, through a real worker: the local backend at its
default $0.005 per image, and the Replicate price model for a typical SDXL run (40 steps on an
A40, ~7 s of ``predict_time`` at $0.000725/s)."""

from __future__ import annotations

from decimal import Decimal

from bench.common import cluster, figure, load_plan, table
from worker import constants as c

SDXL_PREDICT_TIME_S = Decimal("7")


def main() -> None:
    rows = []
    replicate_per_image = SDXL_PREDICT_TIME_S * c.DEFAULT_HARDWARE_PRICE_PER_S
    with cluster(LOCAL_GENERATOR_LATENCY_S="0.1") as (runner, _):
        for name in ("minimal_1x1", "typical_2x2", "repeated_scene", "large_5x3"):
            run = runner(load_plan(name), duration_seconds=180, timeout_s=60)
            images = run.result["total_references"]
            local = Decimal(run.result["total_cost"])
            replicate = replicate_per_image * images
            figure("cost_per_job", float(local), "USD", plan=name, images=images, backend="local")
            figure(
                "cost_per_job",
                float(replicate),
                "USD",
                plan=name,
                images=images,
                backend="replicate_model",
                predict_time_s=float(SDXL_PREDICT_TIME_S),
            )
            rows.append(
                (
                    f"{name} ({images} images)",
                    f"local ${local}   Replicate ≈ ${replicate:.4f}   (target < $0.10)",
                )
            )
    table("Cost per job", rows)


if __name__ == "__main__":
    main()
