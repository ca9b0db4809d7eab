"""The gateway under a crowd: 1,000, 5,000 and 10,000 SSE streams on one gateway process, the
shared reader (``refgen gateway``) and the old design (``bench/legacy_gateway.py``: one
``XREAD`` per stream) in the same run.

Events flow while the streams are open: every job gets an event every ``EVENT_EVERY_S`` (at a
random phase) until its end, a random moment in the second half of the flow, then its final
``stage_update``; they are published by the worker's own publisher
(``worker.events.EventPublisher``, the Lua ``announce`` a worker uses). Beside them,
``REAL_JOBS`` of the watched jobs are real ones: a ``refgen worker`` makes their images while
the flow runs, and their viewers must get every event of the job too. Viewers
(``tasks/crowd.py``) run in ``CLIENT_PROCESSES`` processes of their own, ``VIEWERS_PER_JOB``
per job.

Figures per design and size: p50/p99 delay from ``published_at`` (Redis's clock) to receipt,
the share of deliveries made (every event to every viewer of its job), the gateway's RSS per
idle stream, and its CPU (share of one core) while events flow.

``python -m bench.gateway [--sizes 1000,5000,10000] [--designs new,old] [--flow-s 20]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import redis

from bench.common import ROOT, figure, load_plan, table
from gateway.stream import is_final
from tasks.crowd import FINISHED, open_viewers
from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer, free_port
from worker import constants as c
from worker.events import EventPublisher, Progress

VIEWERS_PER_JOB = 10
EVENT_EVERY_S = 2.0
CLIENT_PROCESSES = 2
SETTLE_S = 5.0
REAL_JOBS = 8
REAL_IMAGE_S = 1.0


@dataclass
class Result:
    design: str
    streams: int
    opened: int
    p50_ms: float
    p99_ms: float
    delivered: float
    rss_kb_per_stream: float
    cpu_percent: float


def crowd(port: int, paths: list[str], pipe: Connection) -> None:
    """A client process: opens its viewers, then reports what they received when told."""
    asyncio.run(_crowd(port, paths, pipe))


async def _crowd(port: int, paths: list[str], pipe: Connection) -> None:
    viewers = await open_viewers("127.0.0.1", port, paths, at_once=250, timeout_s=120)
    # The measuring side's own pauses are no part of the gateway's delay: its long-lived
    # objects are left out of garbage collection.
    gc.freeze()
    pipe.send(sum(v.status == 200 for v in viewers))
    await asyncio.to_thread(pipe.recv)  # collect
    # Each viewer's first event is the job's history (replayed on connecting): not counted.
    received = [(v.path, max(len(v.ids) - 1, 0)) for v in viewers if v.status == 200]
    delays = [d for v in viewers if v.status == 200 for d in v.delays[1:]]
    pipe.send((received, delays))
    for viewer in viewers:
        viewer.close()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(
    design: str, env: dict[str, str], port: int, log: Path
) -> subprocess.Popen[bytes]:
    command = (
        [sys.executable, "-m", "tasks.cli", "gateway", "--port", str(port)]
        if design == "new"
        else [sys.executable, "-m", "bench.legacy_gateway", str(port)]
    )
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz")
            return process
        except httpx.TransportError:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)


def run_one(url: str, design: str, streams: int, flow_s: float, tmp: Path) -> Result:
    publisher = EventPublisher(redis.Redis.from_url(url))
    real = [str(uuid.uuid4()) for _ in range(REAL_JOBS)]
    jobs = [f"crowd-{uuid.uuid4().hex[:12]}" for _ in range(streams // VIEWERS_PER_JOB - len(real))]
    for job_id in [*jobs, *real]:
        # The job exists: its history. A real job's start replaces it with its own events.
        publisher.publish(job_id, Progress(progress=0))
    env = base_worker_env(url, tmp / "storage")
    env.update(
        LOG_LEVEL="WARNING",
        GATEWAY_MAX_STREAMS=str(streams + 100),
        GATEWAY_MAX_STREAMS_PER_CLIENT=str(streams + 100),
    )
    port = free_port()
    runner = JobRunner(url)
    worker = WorkerProcess(
        {
            **env,
            "GENERATOR_BACKEND": "local",
            "STORAGE_BACKEND": "local",
            "LOCAL_GENERATOR_LATENCY_S": str(REAL_IMAGE_S),
        },
        tmp / f"worker-{design}-{streams}.log",
        "bench-gw",
    ).start(runner.client)
    gateway = start_gateway(design, env, port, tmp / f"{design}-{streams}.log")
    pipes, clients = [], []
    try:
        base_rss = rss_kb(gateway.pid)
        watched = [*jobs, *real]
        paths = [f"/jobs/{job_id}/events" for job_id in watched for _ in range(VIEWERS_PER_JOB)]
        context = multiprocessing.get_context("spawn")
        for share in range(CLIENT_PROCESSES):
            ours, theirs = context.Pipe()
            client = context.Process(
                target=crowd, args=(port, paths[share::CLIENT_PROCESSES], theirs)
            )
            client.start()
            pipes.append(ours)
            clients.append(client)
        opened = sum(pipe.recv() for pipe in pipes)
        time.sleep(2.0)  # idle streams settle
        per_stream = (rss_kb(gateway.pid) - base_rss) / max(opened, 1)

        cpu_before, flow_started = cpu_s(gateway.pid), time.monotonic()
        for job_id in real:  # sent as upstream does; the worker makes them during the flow
            plan = {**load_plan(), "job_id": job_id}
            runner.client.send_task(
                c.TASK_START, kwargs={"job_id": job_id, "plan": plan, "duration_seconds": 180}
            )
        published = flow(publisher, jobs, flow_s)
        cpu = (cpu_s(gateway.pid) - cpu_before) / (time.monotonic() - flow_started)
        published.update(real_events(url, real, timeout_s=60))
        time.sleep(SETTLE_S)
        for pipe in pipes:
            pipe.send("collect")
        made = expected = 0
        delays: list[float] = []
        for pipe in pipes:
            got, their_delays = pipe.recv()
            # Every event of a job to each of its viewers that got a stream (200).
            for path, count in got:
                made += count
                expected += published[path.split("/")[2]]
            delays += their_delays
        delays.sort()
        return Result(
            design,
            streams,
            opened,
            _quantile(delays, 0.50) * 1000,
            _quantile(delays, 0.99) * 1000,
            made / expected if expected else 0.0,
            per_stream,
            cpu * 100,
        )
    finally:
        for client in clients:
            client.join(timeout=30)
            if client.is_alive():
                client.kill()
        worker.stop()
        gateway.terminate()
        try:
            gateway.wait(timeout=15)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()


def flow(publisher: EventPublisher, jobs: list[str], flow_s: float) -> dict[str, int]:
    """Every job an event every EVENT_EVERY_S (at a random phase) until its end, a random
    moment in the second half of the flow, then its final event; how many each job got.
    Jobs end at different times, as they do: the end of a stream costs the gateway more than
    an event (its access-log line, its connection's teardown)."""
    started = time.monotonic()
    ends = {job_id: started + random.uniform(flow_s / 2, flow_s) for job_id in jobs}
    due = [(started + random.uniform(0, EVENT_EVERY_S), job_id) for job_id in jobs]
    heapq.heapify(due)
    published = dict.fromkeys(jobs, 0)
    while due:
        at, job_id = heapq.heappop(due)
        time.sleep(max(0.0, at - time.monotonic()))
        published[job_id] += 1
        if at < ends[job_id]:
            publisher.publish(job_id, Progress(progress=min(published[job_id], 99)))
            heapq.heappush(due, (at + EVENT_EVERY_S, job_id))
        else:
            publisher.publish(job_id, FINISHED)
    return published


def real_events(url: str, real: list[str], timeout_s: float) -> dict[str, int]:
    """Once every real job has ended: how many events each has (its stream holds them all:
    its start replaced the history put there for the viewers to find the job)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            ended = 0
            for job_id in real:
                last = client.xrevrange(c.events_stream(job_id), count=1)
                fields = last[0][1] if last else None
                if fields and is_final(json.loads(str(fields["message"]))):
                    ended += 1
            if ended == len(real):
                return {job_id: client.xlen(c.events_stream(job_id)) for job_id in real}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(real) - ended} real job(s) did not end")
            time.sleep(0.5)
    finally:
        client.close()


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway")
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--designs", default="new,old")
    parser.add_argument("--flow-s", type=float, default=20.0)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="refgen-bench-gw-") as tmp, RedisServer() as broker:
        for streams in (int(s) for s in args.sizes.split(",")):
            for design in args.designs.split(","):
                result = run_one(broker.url, design, streams, args.flow_s, Path(tmp))
                results.append(result)
                context = {"design": design, "streams": streams, "opened": result.opened}
                figure("gateway_delay_p50", result.p50_ms, "ms", **context)
                figure("gateway_delay_p99", result.p99_ms, "ms", **context)
                figure("gateway_delivered", result.delivered * 100, "%", **context)
                figure("gateway_rss_per_stream", result.rss_kb_per_stream, "KB", **context)
                figure("gateway_cpu", result.cpu_percent, "% of a core", **context)
    table(
        f"gateway: {VIEWERS_PER_JOB} viewers per job, an event per job every "
        f"{EVENT_EVERY_S:g} s for {args.flow_s:g} s",
        [
            (
                f"{r.design} {r.streams}",
                f"open {r.opened}, p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms, "
                f"delivered {r.delivered:.1%}, {r.rss_kb_per_stream:.1f} KB/stream, "
                f"CPU {r.cpu_percent:.0f}%",
            )
            for r in results
        ],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
