"""Redis memory a finished job keeps until it expires (result, bookkeeping, Celery's task
results): the figure behind the Scaling arithmetic."""

from __future__ import annotations

import redis

from bench.common import cluster, figure, load_plan, table

JOBS = 100


def main() -> None:
    with cluster(LOCAL_GENERATOR_LATENCY_S="0.05", REFERENCE_GEN_CONCURRENCY="8") as (runner, _):
        client = redis.Redis.from_url(runner.redis_url)
        runner(load_plan(), timeout_s=60)  # warm-up: queues and structures exist
        before = int(client.info("memory")["used_memory"])
        plans = [load_plan() for _ in range(JOBS)]
        for plan in plans:
            runner.client.send_task(
                "reference_generator.start", kwargs={"job_id": plan["job_id"], "plan": plan}
            )
        for plan in plans:
            runner.client.AsyncResult(plan["job_id"]).get(timeout=300)
        after = int(client.info("memory")["used_memory"])
        keys = int(client.dbsize())
    per_job = (after - before) / JOBS
    figure("redis_bytes_per_finished_job", per_job, "bytes", images=4, keys=keys)
    table(
        "Redis memory kept per finished 4-image job",
        [("per job", f"{per_job / 1024:.1f} KiB"), ("keys after", str(keys))],
    )


if __name__ == "__main__":
    main()
