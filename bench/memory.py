"""Peak memory of the whole worker (every process) while it makes 4 real 1024×1024 PNGs.

PSS counts a shared page once across the processes that map it, as a container's limit does;
RSS is shown beside it for comparison. Pools compared: threads (the default) and prefork.
"""

from __future__ import annotations

import threading
import time

from bench.common import cluster, figure, load_plan, table
from worker.retirement import memory_kb


def measure(pool: str) -> tuple[float, float, float]:
    with cluster(
        REFERENCE_GEN_POOL=pool, REFERENCE_GEN_CONCURRENCY="4", LOCAL_GENERATOR_LATENCY_S="1"
    ) as (runner, workers):
        pid = workers[0].process.pid  # type: ignore[union-attr]
        idle_pss = memory_kb(pid).pss
        peak = [0, 0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                now = memory_kb(pid)
                peak[0], peak[1] = max(peak[0], now.pss), max(peak[1], now.rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        for _ in range(3):  # a few jobs: caches and pools warm up, peaks show
            run = runner(load_plan(), timeout_s=120)
            assert run.result["status"] == "success"
        done.set()
        sampler.join()
    return idle_pss / 1024, peak[0] / 1024, peak[1] / 1024


def main() -> None:
    rows = []
    for pool in ("threads", "prefork"):
        idle, pss, rss = measure(pool)
        figure("worker_memory_peak_pss", pss, "MB", pool=pool, concurrency=4)
        figure("worker_memory_peak_rss", rss, "MB", pool=pool, concurrency=4)
        figure("worker_memory_idle_pss", idle, "MB", pool=pool, concurrency=4)
        rows.append(
            (
                f"{pool} × 4",
                f"peak PSS {pss:6.1f} MB   peak RSS {rss:6.1f} MB   idle PSS {idle:6.1f} MB",
            )
        )
    table("Worker memory while making 4 real 1024×1024 PNGs (3 jobs)", rows)


if __name__ == "__main__":
    main()
