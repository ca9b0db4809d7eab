"""Event latency: from the worker's publish (the ``published_at`` Redis stamps on each
message) to a subscriber's receipt, p50 and p99, with 100 jobs in flight."""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as EventType

import redis

from bench.common import cluster, figure, load_plan, table

JOBS = 100


def subscriber(url: str, ready: EventType, stop: EventType, out: Queue[list[float]]) -> None:
    """A separate process, as a gateway would be: nothing else competes for its GIL."""
    pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.psubscribe("job_events:*")
    pubsub.get_message(timeout=1)
    ready.set()
    latencies = []
    while not stop.is_set():
        message = pubsub.get_message(timeout=0.5)
        if message is None:
            continue
        received = time.time()
        latencies.append(received - json.loads(message["data"])["published_at"])
    out.put(latencies)


def main() -> None:
    with cluster(workers=2, LOCAL_GENERATOR_LATENCY_S="0.5", REFERENCE_GEN_CONCURRENCY="8") as (
        runner,
        _,
    ):
        context = multiprocessing.get_context("spawn")
        ready, stop, out = context.Event(), context.Event(), context.Queue()
        listener = context.Process(target=subscriber, args=(runner.redis_url, ready, stop, out))
        listener.start()
        ready.wait(10)
        plans = [load_plan() for _ in range(JOBS)]
        for plan in plans:  # all 100 in flight at once
            runner.client.send_task(
                "reference_generator.start", kwargs={"job_id": plan["job_id"], "plan": plan}
            )
        for plan in plans:
            runner.client.AsyncResult(plan["job_id"]).get(timeout=600)
        time.sleep(0.5)
        stop.set()
        latencies = sorted(out.get(timeout=30))
        listener.join()
    ms = [x * 1000 for x in latencies]
    p50, p99 = statistics.median(ms), ms[int(len(ms) * 0.99) - 1]
    figure("event_latency_p50", p50, "ms", events=len(ms), jobs=JOBS)
    figure("event_latency_p99", p99, "ms", events=len(ms), jobs=JOBS, target=10)
    table(
        f"Event latency, publish → subscriber, {JOBS} jobs in flight",
        [
            ("events", str(len(ms))),
            ("p50", f"{p50:.2f} ms"),
            ("p99", f"{p99:.2f} ms (target ≤ 10)"),
            ("max", f"{ms[-1]:.2f} ms"),
        ],
    )


if __name__ == "__main__":
    main()
