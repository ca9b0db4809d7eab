"""Soak: thousands of jobs through one worker, watching for anything that grows per job.

One ``refgen worker`` (threads pool, default concurrency), jobs of four images at a tiny local
latency, a steady number of jobs in flight. Every ``--every`` jobs the work is drained and the
worker's PSS is read. At the end: pub/sub channels still subscribed on the Redis server, keys
without an expiry, and the worker's client output buffers on the server.

The figure that matters is the growth between the first sample after warm-up (``--every``
jobs × 2) and the last. ``python -m bench.soak --jobs 500`` is a quick look.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any

import redis

from bench.common import cluster, figure, load_plan, table
from bench.redis_memory import key_family
from tasks.harness import JobFeeder
from worker.retirement import Memory, memory_kb

IMAGES_PER_JOB = 4


def redis_leftovers(client: redis.Redis) -> dict[str, Any]:
    """What the Redis server holds for this worker once every job has ended."""
    no_ttl: Counter[str] = Counter()
    with_ttl: Counter[str] = Counter()
    keys = 0
    for batch in _batches(client.scan_iter(count=1000), 500):
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.ttl(key)
        for key, ttl in zip(batch, pipe.execute(), strict=True):
            keys += 1
            family = key_family(key.decode() if isinstance(key, bytes) else key)
            (no_ttl if ttl == -1 else with_ttl)[family] += 1
    channels = [c.decode() if isinstance(c, bytes) else c for c in client.pubsub_channels()]
    numsub = dict(client.pubsub_numsub(*channels)) if channels else {}
    clients = [c for c in client.client_list() if c.get("name") != "soak-observer"]
    return {
        "keys": keys,
        "keys_without_ttl": dict(no_ttl),
        "keys_with_ttl": dict(with_ttl),
        "channels": len(channels),
        "channels_result": sum(1 for c in channels if c.startswith("celery-task-meta-")),
        "subscriptions": int(sum(numsub.values())),
        "client_output_bytes": sum(int(c.get("omem", 0)) for c in clients),
        "pubsub_clients": sum(1 for c in clients if int(c.get("sub", 0)) > 0),
    }


def _batches(items: Any, size: int) -> Any:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000, help="jobs in all (default 5000)")
    parser.add_argument("--every", type=int, default=500, help="jobs between samples")
    parser.add_argument("--in-flight", type=int, default=8, help="jobs queued at once")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per image")
    parser.add_argument(
        "--flaky",
        default="",
        help="image ids whose first attempt fails, so every job has a retry (e.g. city_street)",
    )
    args = parser.parse_args(argv)

    with cluster(
        LOCAL_GENERATOR_LATENCY_S=str(args.latency), LOCAL_GENERATOR_FLAKY_IDS=args.flaky
    ) as (runner, workers):
        pid = workers[0].process.pid  # type: ignore[union-attr]
        observer = redis.Redis.from_url(runner.redis_url)
        observer.client_setname("soak-observer")
        feeder = JobFeeder(runner.redis_url, load_plan(), args.in_flight)
        samples: list[tuple[int, Memory]] = []
        started = time.perf_counter()
        for until in range(args.every, args.jobs + 1, args.every):
            feeder.run(until)
            time.sleep(0.5)  # the last jobs' acks and events settle
            memory = memory_kb(pid)
            samples.append((feeder.done, memory))
            print(
                f"  {feeder.done:6d} jobs  PSS {memory.pss / 1024:6.1f} MB"
                f"  USS {memory.uss / 1024:6.1f} MB  RSS {memory.rss / 1024:6.1f} MB"
                f"  {feeder.done / (time.perf_counter() - started):5.1f} jobs/s",
                flush=True,
            )
        elapsed = time.perf_counter() - started
        leftovers = redis_leftovers(observer)
        retention_entries = int(observer.zcard("refgen:retention"))
        used_memory = int(observer.info("memory")["used_memory"])

    failures = len(feeder.failed) + sum(
        1 for r in feeder.results.values() if not r or r.get("status") != "success"
    )
    costs = Counter(str(r.get("total_cost")) for r in feeder.results.values() if r)
    # Growth is measured from the second sample: the first holds the warm-up (pools,
    # connections, caches filling).
    (first_jobs, first), (last_jobs, last) = samples[1 if len(samples) > 2 else 0], samples[-1]
    span = last_jobs - first_jobs
    growth = {name: (getattr(last, name) - getattr(first, name)) / 1024 for name in Memory._fields}
    figure("soak_jobs", feeder.done, "jobs", failed=failures, seconds=round(elapsed))
    for done, memory in samples:
        uss, rss = round(memory.uss / 1024, 1), round(memory.rss / 1024, 1)
        figure("soak_worker_pss", memory.pss / 1024, "MB", jobs=done, uss_mb=uss, rss_mb=rss)
    for name, mb in growth.items():
        figure(f"soak_{name}_growth", mb, "MB", from_jobs=first_jobs, to_jobs=last_jobs)
    figure("soak_result_channels_left", leftovers["channels_result"], "channels", target=0)
    figure("soak_subscriptions_left", leftovers["subscriptions"], "subscriptions")
    no_ttl = leftovers["keys_without_ttl"]
    per_job_no_ttl = {k: n for k, n in no_ttl.items() if "{" in k}  # named after a job
    figure("soak_keys_without_ttl", sum(no_ttl.values()), "keys", families=no_ttl)
    figure("soak_per_job_keys_without_ttl", sum(per_job_no_ttl.values()), "keys", target=0)
    figure("soak_worker_client_output_buffers", leftovers["client_output_bytes"], "bytes")
    figure("soak_redis_used_memory", used_memory / 2**20, "MB", keys=leftovers["keys"])

    def series(name: str) -> str:
        return " → ".join(f"{getattr(m, name) / 1024:.1f}" for _, m in samples) + " MB"

    table(
        f"Soak: {feeder.done} jobs × {IMAGES_PER_JOB} images at {args.latency:g} s, "
        f"1 worker (threads), {elapsed:.0f} s" + (f", flaky: {args.flaky}" if args.flaky else ""),
        [
            ("jobs not successful", str(failures)),
            ("job costs seen", ", ".join(f"${c} × {n}" for c, n in costs.items())),
            ("worker PSS", series("pss")),
            ("worker USS (private)", series("uss")),
            ("worker RSS", series("rss")),
            (
                f"growth, jobs {first_jobs}→{last_jobs}",
                "  ".join(
                    f"{name.upper()} {mb:+.2f} MB ({mb * 1024 / span:+.3f} KB a job)"
                    for name, mb in growth.items()
                ),
            ),
            ("result channels left subscribed", str(leftovers["channels_result"])),
            ("all subscriptions left", str(leftovers["subscriptions"])),
            ("keys without a TTL", json.dumps(no_ttl) if no_ttl else "0"),
            ("… of them named after a job", str(sum(per_job_no_ttl.values()))),
            ("keys with a TTL", json.dumps(leftovers["keys_with_ttl"])),
            ("retention index entries (purged when due)", str(retention_entries)),
            ("worker client output buffers", f"{leftovers['client_output_bytes']} bytes"),
            ("Redis used_memory", f"{used_memory / 2**20:.1f} MB"),
        ],
    )


if __name__ == "__main__":
    main()
