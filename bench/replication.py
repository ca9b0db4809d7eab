"""What waiting for a replica costs (README: Redis failover).

Two clusters side by side, each a ``redis-server`` with one replica attached and a real
worker: one with ``REDIS_WAIT_REPLICAS=1`` (charges, outcomes, prediction checkpoints, the
plan and the result wait for the replica), one with 0. Jobs alternate between them, so drift
on the machine hits both alike. Also the cost of one waited write, in this process.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from functools import partial
from urllib.parse import urlsplit

import redis
from redis.client import Pipeline

from bench.common import cluster, figure, load_plan, table
from tasks.localredis import free_port
from worker.replication import Replication

LATENCY_S = 0.5
ROUNDS = 7
WRITES = 2000


def attach_replica(stack: ExitStack, primary_url: str) -> None:
    port, primary = free_port(), urlsplit(primary_url).port
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="refgen-replica-"))
    process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--dir", folder, "--replicaof", "127.0.0.1", str(primary)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stack.callback(process.wait)
    stack.callback(process.kill)
    replica = redis.Redis(port=port, decode_responses=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if replica.info("replication").get("master_link_status") == "up":
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the replica never synced")


def _charge(field: str, pipe: Pipeline) -> None:
    pipe.hset("bench:charges", field, 1)


def per_write_us(url: str, replicas: int) -> float:
    client = redis.Redis.from_url(url, decode_responses=True)
    replication = Replication(client, replicas=replicas, timeout_ms=1000)
    started = time.perf_counter()
    for i in range(WRITES):
        replication.write("bench", partial(_charge, f"image-{i}"))
    took = (time.perf_counter() - started) / WRITES * 1e6
    client.delete("bench:charges")
    client.close()
    return took


def main() -> None:
    latencies: dict[str, list[float]] = {"waits": [], "no_wait": []}
    with ExitStack() as stack:
        runners = {}
        for name, replicas in (("waits", "1"), ("no_wait", "0")):
            runner, _ = stack.enter_context(
                cluster(
                    LOCAL_GENERATOR_LATENCY_S=str(LATENCY_S),
                    REFERENCE_GEN_CONCURRENCY="4",
                    REDIS_WAIT_REPLICAS=replicas,
                )
            )
            attach_replica(stack, runner.redis_url)
            runner(load_plan(), timeout_s=60)  # warm-up
            runners[name] = runner
        for _ in range(ROUNDS):
            for name, runner in runners.items():
                started = time.perf_counter()
                run = runner(load_plan(), timeout_s=60)
                latencies[name].append(time.perf_counter() - started)
                assert run.result["status"] == "success"
        write_waits = per_write_us(runners["waits"].redis_url, 1)
        write_plain = per_write_us(runners["waits"].redis_url, 0)
    median = {name: statistics.median(values) for name, values in latencies.items()}
    ratio = median["waits"] / median["no_wait"]
    figure("replication_job_latency_waits", median["waits"], "s", rounds=ROUNDS)
    figure("replication_job_latency_no_wait", median["no_wait"], "s", rounds=ROUNDS)
    figure("replication_job_latency_ratio", ratio, "x")
    figure("replication_write_us_waits", write_waits, "us", writes=WRITES)
    figure("replication_write_us_no_wait", write_plain, "us", writes=WRITES)
    table(
        f"Waiting for a replica: 4 images at {LATENCY_S:g} s, median of {ROUNDS}, one replica",
        [
            ("job latency, writes wait (REDIS_WAIT_REPLICAS=1)", f"{median['waits']:.3f} s"),
            ("job latency, no waiting", f"{median['no_wait']:.3f} s"),
            ("ratio", f"{ratio:.3f} ×"),
            ("one write + WAIT, in this process", f"{write_waits:.0f} µs"),
            ("one write alone (pipeline)", f"{write_plain:.0f} µs"),
        ],
    )


if __name__ == "__main__":
    main()
