"""Redis memory a finished job keeps, and for how long: the whole server's growth per job, and
each kind of key a job leaves (Celery's results and chord marker, our bookkeeping, the events
stream) with its size per job and its time to live. The figures behind the Scaling arithmetic.
"""

from __future__ import annotations

from collections import defaultdict

import redis

from bench.common import cluster, figure, load_plan, table
from tasks.harness import JobFeeder

JOBS = 100


def key_family(key: str) -> str:
    """A key's name with its ids blanked out: what kind of key it is."""
    if key.startswith("celery-task-meta-"):
        return "celery-task-meta-{job}:{image}" if ":" in key else "celery-task-meta-{job}"
    if key.startswith("celery-taskset-meta-"):
        return "celery-taskset-meta-{group}" + key[key.rfind(".") :]
    if key.startswith("refgen:job:{"):
        return "refgen:job:{job}:" + key.split("}:", 1)[1].split(":", 1)[0]
    if key.startswith("refgen:events:{"):
        return "refgen:events:{job}"
    return key


def per_family(client: redis.Redis) -> dict[str, tuple[int, int, int]]:
    """family → (keys, bytes, longest TTL in seconds; -1 for none)."""
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0, -2])
    for key in client.scan_iter(count=1000):
        family = found[key_family(key.decode())]
        family[0] += 1
        family[1] += int(client.memory_usage(key) or 0)
        ttl = int(client.ttl(key))
        family[2] = -1 if ttl == -1 or family[2] == -1 else max(family[2], ttl)
    return {name: (n, size, ttl) for name, (n, size, ttl) in found.items()}


def _ttl(seconds: int) -> str:
    if seconds < 0:
        return "none"
    return f"{seconds / 86400:.0f} d" if seconds >= 86400 else f"{seconds} s"


def main() -> None:
    with cluster(LOCAL_GENERATOR_LATENCY_S="0.05", REFERENCE_GEN_CONCURRENCY="8") as (runner, _):
        client = redis.Redis.from_url(runner.redis_url)
        feeder = JobFeeder(runner.redis_url, load_plan(), in_flight=JOBS)
        feeder.run(1)  # warm-up: queues and structures exist
        before = int(client.info("memory")["used_memory"])
        before_families = per_family(client)
        feeder.run(1 + JOBS)
        assert not feeder.failed
        after = int(client.info("memory")["used_memory"])
        keys = int(client.dbsize())
        families = per_family(client)
    per_job = (after - before) / JOBS
    figure("redis_bytes_per_finished_job", per_job, "bytes", images=4, keys=keys)
    rows = [("whole server, per job", f"{per_job / 1024:.1f} KiB ({keys} keys after)")]
    for name, (count, size, ttl) in sorted(families.items(), key=lambda f: -f[1][1]):
        old_count, old_size, _ = before_families.get(name, (0, 0, 0))
        keys_per_job = (count - old_count) / JOBS
        bytes_per_job = (size - old_size) / JOBS
        if keys_per_job == 0 and bytes_per_job < 8:
            continue  # not per job: the queues' bindings, the metrics hash
        figure("redis_key_family", bytes_per_job, "bytes/job", key=name, ttl_s=ttl)
        rows.append(
            (name, f"{bytes_per_job:7.0f} B a job  ({keys_per_job:g} keys)  TTL: {_ttl(ttl)}")
        )
    table("Redis memory kept per finished 4-image job", rows)


if __name__ == "__main__":
    main()
