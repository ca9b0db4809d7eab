"""The gateway under a crowd and under abuse, against a real ``refgen gateway`` process and a
real redis-server: 2,000 streams with events flowing, the caps, slowloris, and running out of
file descriptors. Events are published by the worker's own publisher (its Lua ``announce``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tasks.crowd import FINISHED, Viewer, open_viewers
from tasks.harness import base_worker_env
from tasks.localredis import RedisServer, free_port
from tests.integration.gatewaykit import log_lines, running_gateway
from worker import constants as c
from worker.events import EventPublisher, Progress

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@dataclass
class Gateway:
    url: str
    port: int
    log: Path
    redis: redis.Redis
    publisher: EventPublisher


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def gateway_env(broker: RedisServer, tmp_path: Path) -> dict[str, str]:
    env = base_worker_env(broker.url, tmp_path / "storage")
    env.update(GATEWAY_KEEPALIVE_S="1")
    return env


@contextlib.contextmanager
def start(
    broker: RedisServer, env: dict[str, str], log: Path, refgen: list[str] | None = None
) -> Iterator[Gateway]:
    port = free_port()
    with running_gateway(env, log, port, refgen=refgen) as url:
        client = redis.Redis.from_url(broker.url, decode_responses=True)
        yield Gateway(url, port, log, client, EventPublisher(client))


def new_jobs(gateway: Gateway, count: int) -> list[str]:
    jobs = [f"crowd-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    for job_id in jobs:
        gateway.publisher.publish(job_id, Progress(progress=0))  # known, with a history
    return jobs


def written(gateway: Gateway, job_id: str) -> list[str]:
    return [entry_id for entry_id, _ in gateway.redis.xrange(c.events_stream(job_id))]


def connected_clients(gateway: Gateway) -> int:
    return int(gateway.redis.info("clients")["connected_clients"])


async def until(condition, what: str, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def no_tracebacks(log: Path) -> None:
    text = log.read_text()
    assert "Traceback" not in text
    assert all(isinstance(line, dict) for line in log_lines(log))


def test_2000_streams_with_events_flowing_each_get_every_event_of_their_job(
    broker, gateway_env, tmp_path
) -> None:
    viewers_per_job, rounds = 10, 5
    gateway_env.update(GATEWAY_MAX_STREAMS_PER_CLIENT="2000")  # one test process: one client
    with start(broker, gateway_env, tmp_path / "gateway.log") as gateway:
        jobs = new_jobs(gateway, 200)
        before = connected_clients(gateway)

        async def scenario() -> list[Viewer]:
            paths = [f"/jobs/{j}/events" for j in jobs for _ in range(viewers_per_job)]
            viewers = await open_viewers("127.0.0.1", gateway.port, paths, at_once=250)
            assert [v.status for v in viewers] == [200] * len(paths)
            # Everyone has its history: everyone is in the fan-out.
            await until(lambda: all(v.ids for v in viewers), "a viewer never got its history")
            # The gateway's Redis connections do not grow with its viewers.
            assert connected_clients(gateway) - before < 100
            for value in range(1, rounds + 1):
                for job_id in jobs:
                    await asyncio.to_thread(
                        gateway.publisher.publish, job_id, Progress(progress=value)
                    )
            for job_id in jobs:
                await asyncio.to_thread(gateway.publisher.publish, job_id, FINISHED)
            await until(lambda: all(v.ended for v in viewers), "a stream never ended")
            return viewers

        viewers = asyncio.run(scenario())
        history = {job_id: written(gateway, job_id) for job_id in jobs}
        assert all(len(ids) == rounds + 2 for ids in history.values())
        for viewer in viewers:
            # Every event of its job, in order, once, and the stream ended after the final.
            assert viewer.ids == history[viewer.path.split("/")[2]]
            assert viewer.finals == 1
        metrics = httpx.get(f"{gateway.url}/metrics").text
        assert "refgen_gateway_open_streams 0.0" in metrics
        assert f"refgen_gateway_events_fanned_out_total {2000.0 * (rounds + 1)}" in metrics
    no_tracebacks(gateway.log)


def test_past_the_caps_503_with_retry_after_and_the_viewers_already_in_carry_on(
    broker, gateway_env, tmp_path
) -> None:
    gateway_env.update(GATEWAY_MAX_STREAMS="50", GATEWAY_MAX_STREAMS_PER_CLIENT="30")
    with start(broker, gateway_env, tmp_path / "gateway.log") as gateway:
        (job_id,) = new_jobs(gateway, 1)
        path = f"/jobs/{job_id}/events"

        async def scenario() -> None:
            first = await open_viewers("127.0.0.1", gateway.port, [path] * 31)
            assert sorted(v.status or 0 for v in first) == [200] * 30 + [503]
            (refused,) = [v for v in first if v.status == 503]
            assert refused.headers["retry-after"].isdigit()
            # A header cannot make one client into another: no proxy is trusted by default.
            (forged,) = await open_viewers(
                "127.0.0.1", gateway.port, [path], headers="X-Forwarded-For: 10.0.0.1\r\n"
            )
            assert forged.status == 503
            second = await open_viewers("127.0.0.1", gateway.port, [path] * 20, source="127.0.0.2")
            assert [v.status for v in second] == [200] * 20
            (full,) = await open_viewers("127.0.0.1", gateway.port, [path], source="127.0.0.3")
            assert full.status == 503 and int(full.headers["retry-after"]) >= 1
            await until(lambda: "maximum of 50 event streams" in full.unread, "no reason given")
            inside = [v for v in first if v.status == 200] + second
            await until(lambda: all(v.ids for v in inside), "history not replayed")
            await asyncio.to_thread(gateway.publisher.publish, job_id, FINISHED)
            await until(lambda: all(v.ended for v in inside), "the viewers inside stalled")
            assert all(v.ids == written(gateway, job_id) for v in inside)
            # Their slots are free again: a refused client gets in now.
            (again,) = await open_viewers("127.0.0.1", gateway.port, [path], source="127.0.0.3")
            assert again.status == 200

        asyncio.run(scenario())
        metrics = httpx.get(f"{gateway.url}/metrics").text
        assert 'refgen_gateway_streams_refused_total{reason="full"} 1.0' in metrics
        assert 'refgen_gateway_streams_refused_total{reason="per_client"} 2.0' in metrics
    no_tracebacks(gateway.log)


def test_slowloris_connections_are_closed_and_a_real_viewer_is_served(
    broker, gateway_env, tmp_path
) -> None:
    gateway_env.update(GATEWAY_HEADER_TIMEOUT_S="1")
    with start(broker, gateway_env, tmp_path / "gateway.log") as gateway:
        (job_id,) = new_jobs(gateway, 1)
        trickling = []
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", gateway.port))
            sock.sendall(b"GET /jobs/")
            sock.settimeout(0.05)
            trickling.append(sock)
        closed: set[int] = set()
        deadline = time.monotonic() + 30
        while len(closed) < len(trickling):
            assert time.monotonic() < deadline, f"{len(trickling) - len(closed)} still open"
            for number, sock in enumerate(trickling):
                if number in closed:
                    continue
                try:
                    sock.sendall(b"x")  # one more header byte, as slowloris does
                    if sock.recv(1) == b"":
                        closed.add(number)
                except TimeoutError:
                    pass
                except OSError:
                    closed.add(number)
            time.sleep(0.2)
        for sock in trickling:
            sock.close()
        gateway.publisher.publish(job_id, FINISHED)
        with httpx.stream("GET", f"{gateway.url}/jobs/{job_id}/events", timeout=10) as response:
            assert response.status_code == 200
            assert sum(line.startswith("id:") for line in response.iter_lines()) == 2
    no_tracebacks(gateway.log)


# The gateway with a hard limit of LOW_FDS open files: it cannot raise it.
LOW_FDS = 120
LOW_FD_GATEWAY = [
    sys.executable,
    "-c",
    "import resource, sys; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LOW_FDS}, {LOW_FDS})); "
    "from tasks.cli import main; sys.exit(main())",
]


def test_out_of_file_descriptors_is_a_503_and_one_log_line(broker, gateway_env, tmp_path) -> None:
    gateway_env.update(LOG_FORMAT="json", GATEWAY_HEADER_TIMEOUT_S="60")
    log = tmp_path / "gateway.log"
    with start(broker, gateway_env, log, refgen=LOW_FD_GATEWAY) as gateway:
        (job_id,) = new_jobs(gateway, 1)
        # Connections that say nothing hold a descriptor each, until there are none left.
        idle = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(LOW_FDS)]
        for sock in idle:
            sock.setblocking(False)
        refused: list[bytes] = []
        deadline = time.monotonic() + 20
        while not refused:  # the connections that found no descriptor are answered
            assert time.monotonic() < deadline, "no connection was answered 503"
            time.sleep(0.1)
            for sock in idle:
                with contextlib.suppress(BlockingIOError):
                    answer = sock.recv(4096)
                    if answer.startswith(b"HTTP/1.1 503"):
                        refused.append(answer)
        assert refused, "no connection was answered 503"
        assert all(b"retry-after: " in a for a in refused)
        for sock in idle:
            sock.close()
        # Descriptors back: the gateway serves again.
        gateway.publisher.publish(job_id, FINISHED)
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"{gateway.url}/jobs/{job_id}/events", timeout=5)
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway never served again"
            time.sleep(0.2)
    lines = log_lines(log)
    out_of = [line for line in lines if line["event"] == "out_of_file_descriptors"]
    assert len(out_of) == 1 and out_of[0]["answered_503"] >= 1
    (lowered,) = [line for line in lines if line["event"] == "stream_cap_lowered"]
    assert lowered["max_streams"] == LOW_FDS - 64
    no_tracebacks(log)
