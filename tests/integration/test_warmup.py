"""The warm-up a worker does as it starts (tasks/warmup.py, worker/warmup.py), seen from Redis:
the first job after a start opens no connection of its own. Each one it opened was a round
trip or four on its way (issue 23), and some came with a result backend made on the spot."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tasks.harness import (
    JobRunner,
    WorkerProcess,
    bare_client,
    local_worker_env,
    replicate_worker_env,
)
from tasks.localredis import RedisServer
from tests.fakes.replicate_server import FakeReplicate, PredictionPlan


def worker_connections(client: redis.Redis, pid: int) -> set[int]:
    """The ids (``CLIENT LIST``) of the Redis connections that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return {
        int(entry["id"])
        for entry in client.client_list()
        if int(entry["addr"].rsplit(":", 1)[1]) in ports
    }


def settled(client: redis.Redis, pid: int, timeout_s: float = 20) -> set[int]:
    """The worker's connections once its warm-up has stopped opening them (its pool threads
    warm after it answers its first ping)."""
    deadline = time.monotonic() + timeout_s
    last = worker_connections(client, pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = worker_connections(client, pid)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the worker kept opening connections: {sorted(last)}")


def test_the_first_job_after_a_start_opens_no_connection(
    tmp_path: Path, load_plan: Callable[..., dict[str, Any]]
) -> None:
    with RedisServer() as server:
        env = local_worker_env(server.url, tmp_path / "storage", latency_s=0.3)
        env.update(REFERENCE_GEN_CONCURRENCY="4")
        worker = WorkerProcess(env, tmp_path / "worker.log", "warm").start(bare_client(server.url))
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert worker.process is not None
            pid = worker.process.pid
            before = settled(client, pid)
            assert before, "no connection of the worker's was found"
            run = JobRunner(server.url)(load_plan("typical_2x2"))
            assert run.result is not None and run.result["status"] == "success"
            opened = settled(client, pid) - before  # the chord's finalize included
            assert not opened, [e for e in client.client_list() if int(e["id"]) in opened]
        finally:
            client.close()
            worker.stop()


def test_on_the_replicate_path_the_first_jobs_creates_ride_connections_opened_at_start(
    tmp_path: Path, load_plan: Callable[..., dict[str, Any]]
) -> None:
    """Each connection to Replicate is a TLS handshake (several round trips) that the first
    job's creates would otherwise make; the worker opens one per slot as it starts."""
    token = "r8_" + secrets.token_hex(16)
    plan = PredictionPlan(duration=0.3, starting_for=0.1, predict_time=0.2)
    with RedisServer() as server, FakeReplicate(api_token=token, default_plan=plan) as fake:
        env = replicate_worker_env(server.url, tmp_path / "storage", fake.url, token)
        env.update(REFERENCE_GEN_CONCURRENCY="4")
        worker = WorkerProcess(env, tmp_path / "worker.log", "warm").start(bare_client(server.url))
        try:
            deadline = time.monotonic() + 20
            while len(warm := fake.requests_for("account")) < 4:
                assert time.monotonic() < deadline, [r.route for r in fake.requests]
                time.sleep(0.1)
            opened = {r.client_port for r in warm}
            assert len(opened) == 4, "each slot's connection is its own"
            run = JobRunner(server.url)(load_plan("typical_2x2"))
            assert run.result is not None and run.result["status"] == "success"
            creates = fake.requests_for("create")
            assert len(creates) == 4
            assert {r.client_port for r in creates} <= opened
            assert len(fake.requests_for("account")) == 4  # at start only
        finally:
            worker.stop()
