"""The gateway's fan-out (one reader per process) and a viewer's feed, against a real
redis-server, events published by the worker's own publisher (its Lua ``announce``)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Coroutine
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.fanout import Fanout, Viewer
from gateway.feed import EventFeed, FeedOptions, FeedTimer
from gateway.limits import Refusal, Slot, StreamLimits, effective_cap
from gateway.stream_metrics import StreamMetrics
from tasks.crowd import FINISHED
from worker import constants as c
from worker.events import EventPublisher, Progress

OPTIONS = FeedOptions(keepalive_s=5.0, lifetime_s=600.0, write_timeout_s=5.0)


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def job() -> str:
    return f"fan-{uuid.uuid4().hex[:10]}"


def progress(publisher: EventPublisher, job_id: str, *values: int) -> None:
    for value in values:
        publisher.publish(job_id, Progress(progress=value))


def finish(publisher: EventPublisher, job_id: str) -> None:
    publisher.publish(job_id, FINISHED)


class Rig:
    """A started fan-out on the session's redis-server, and what a gateway gives a feed."""

    def __init__(self, url: str, queue_size: int = 64) -> None:
        self.client = aioredis.Redis.from_url(url, decode_responses=True)
        self.metrics = StreamMetrics(CollectorRegistry())
        self.fanout = Fanout(self.client, self.metrics, queue_size=queue_size, patience_s=30)
        self.limits = StreamLimits(100, 100, self.metrics)
        self.timer = FeedTimer(OPTIONS)

    async def __aenter__(self) -> Rig:
        self.fanout.start()
        self.timer.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.timer.stop()
        await self.fanout.stop()
        await self.client.aclose()

    async def viewer(self, job_id: str) -> Viewer:
        viewer = self.fanout.join(job_id)
        await viewer.ready
        return viewer

    def feed(self, job_id: str, after: str | None = None) -> Feed:
        slot = self.limits.admit("127.0.0.1")
        assert isinstance(slot, Slot)
        return Feed(
            EventFeed(self.fanout, self.timer, self.client, self.metrics, job_id, after, slot)
        )


class Feed:
    """Runs one feed as an ASGI app; what it sent, parsed the way a browser parses it."""

    def __init__(self, app: EventFeed) -> None:
        self.bodies: list[bytes] = []
        self.leave = asyncio.Event()
        self.task = asyncio.create_task(app({"type": "http"}, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self.bodies.append(message["body"])

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for block in b"".join(self.bodies).decode().split("\r\n\r\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "id" in lines:
                found.append((lines["id"], json.loads(lines["data"])))
        return found

    async def ended(self) -> bool:
        await asyncio.wait_for(asyncio.shield(self.task), 10)
        return self.bodies[-1] == b""  # the response was completed


async def drain(viewer: Viewer, count: int) -> list[str]:
    return [(await asyncio.wait_for(viewer.queue.get(), 10)).id for _ in range(count)]


def test_each_viewer_gets_its_jobs_live_events_in_order_and_no_other_jobs(redis_server) -> None:
    publisher = EventPublisher(redis.Redis.from_url(redis_server.url))
    first, second = job(), job()

    async def scenario() -> None:
        async with Rig(redis_server.url) as rig:
            a1, a2, b = [await rig.viewer(j) for j in (first, first, second)]
            progress(publisher, first, 1, 2, 3)
            progress(publisher, second, 9)
            a1_ids, a2_ids, b_ids = await drain(a1, 3), await drain(a2, 3), await drain(b, 1)
            written = redis.Redis.from_url(redis_server.url, decode_responses=True)
            expected = [i for i, _ in written.xrange(c.events_stream(first))]
            assert a1_ids == a2_ids == expected
            assert b_ids == [written.xrange(c.events_stream(second))[0][0]]
            assert a1.queue.empty() and b.queue.empty()
            assert rig.metrics.fanned_out._value.get() == 7

    run(scenario())


def test_a_viewer_joining_mid_burst_gets_history_then_live_without_gap_or_duplicate(
    redis_server,
) -> None:
    publisher = EventPublisher(redis.Redis.from_url(redis_server.url))
    job_id = job()

    async def scenario() -> None:
        async with Rig(redis_server.url, queue_size=200) as rig:
            watcher = await rig.viewer(job_id)  # the job is followed already
            progress(publisher, job_id, *range(50))
            feed = rig.feed(job_id)  # joins while the reader is still fanning these out
            for value in range(50, 100):
                progress(publisher, job_id, value)
                await asyncio.sleep(0)
            finish(publisher, job_id)
            assert await feed.ended()
            written = redis.Redis.from_url(redis_server.url, decode_responses=True)
            everything = [i for i, _ in written.xrange(c.events_stream(job_id))]
            assert [i for i, _ in feed.events] == everything
            assert feed.events[-1][1]["data"]["status"] == "completed"
            assert await drain(watcher, 101) == everything

    run(scenario())


def test_resume_after_last_event_id_sends_exactly_the_rest(redis_server) -> None:
    publisher = EventPublisher(redis.Redis.from_url(redis_server.url))
    job_id = job()
    progress(publisher, job_id, 1, 2, 3, 4)
    finish(publisher, job_id)
    written = redis.Redis.from_url(redis_server.url, decode_responses=True)
    everything = [i for i, _ in written.xrange(c.events_stream(job_id))]

    async def scenario() -> None:
        async with Rig(redis_server.url) as rig:
            feed = rig.feed(job_id, after=everything[1])
            assert await feed.ended()
            assert [i for i, _ in feed.events] == everything[2:]

    run(scenario())


def test_a_slow_viewer_is_dropped_and_the_others_get_everything(redis_server) -> None:
    publisher = EventPublisher(redis.Redis.from_url(redis_server.url))
    job_id = job()

    async def scenario() -> None:
        async with Rig(redis_server.url, queue_size=3) as rig:
            slow, fast = await rig.viewer(job_id), await rig.viewer(job_id)
            got: list[str] = []
            for value in range(6):
                progress(publisher, job_id, value)
                got += await drain(fast, 1)  # fast keeps up; slow never reads
            assert len(got) == 6
            assert slow.dropped and not fast.dropped
            assert slow.queue.qsize() == 3  # what it had; it resumes after what it sent
            assert rig.metrics.dropped._value.get() == 1

    run(scenario())


def test_a_feed_that_falls_behind_catches_up_from_the_stream_and_misses_nothing(
    redis_server,
) -> None:
    publisher = EventPublisher(redis.Redis.from_url(redis_server.url))
    job_id = job()

    async def scenario() -> None:
        async with Rig(redis_server.url, queue_size=2) as rig:
            feed = rig.feed(job_id)
            while rig.metrics.viewers._value.get() < 1 or not feed.bodies:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the feed follows its queue
            # A burst more than its queue holds, fanned out by the reader in one go.
            progress(publisher, job_id, *range(10))
            finish(publisher, job_id)
            assert await feed.ended()
            assert rig.metrics.dropped._value.get() >= 1
            written = redis.Redis.from_url(redis_server.url, decode_responses=True)
            assert [i for i, _ in feed.events] == [
                i for i, _ in written.xrange(c.events_stream(job_id))
            ]
            assert rig.limits.open == 0  # its slot was given back

    run(scenario())


def test_an_event_whose_doorbell_was_lost_arrives_once_the_reader_reconnects(
    redis_server, caplog
) -> None:
    job_id = job()
    admin = redis.Redis.from_url(redis_server.url, decode_responses=True)
    message = json.dumps({"event_type": "progress", "data": {"progress": 7}})

    async def scenario() -> None:
        async with Rig(redis_server.url) as rig:
            viewer = await rig.viewer(job_id)
            # Without yielding to the reader: its pub/sub connection is cut, and an event is
            # written with no doorbell at all.
            assert admin.client_kill_filter(_type="pubsub") >= 1
            entry_id = admin.xadd(c.events_stream(job_id), {"message": message})
            assert await drain(viewer, 1) == [entry_id]
            assert rig.fanout.down_since is None  # back

    run(scenario())


def test_shutdown_ends_every_stream(redis_server) -> None:
    job_id = job()

    async def scenario() -> None:
        async with Rig(redis_server.url) as rig:
            feeds = [rig.feed(job_id) for _ in range(3)]
            while rig.metrics.viewers._value.get() < 3:
                await asyncio.sleep(0.01)
            rig.fanout.close()
            assert all([await feed.ended() for feed in feeds])
            assert rig.limits.open == 0

    run(scenario())


def test_a_feed_whose_client_leaves_gives_its_slot_back(redis_server) -> None:
    job_id = job()

    async def scenario() -> None:
        async with Rig(redis_server.url) as rig:
            feed = rig.feed(job_id)
            while rig.metrics.viewers._value.get() < 1:
                await asyncio.sleep(0.01)
            feed.leave.set()
            await asyncio.wait_for(feed.task, 10)
            assert rig.limits.open == 0
            assert rig.metrics.viewers._value.get() == 0

    run(scenario())


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_health_sees_a_stuck_reader_and_a_redis_gone_too_long(redis_server) -> None:
    async def scenario() -> None:
        clock = Clock()
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        metrics = StreamMetrics(CollectorRegistry())
        fanout = Fanout(client, metrics, queue_size=4, patience_s=30, clock=clock)
        assert fanout.trouble(20) == "the stream reader is not running"
        fanout.start()
        await asyncio.sleep(0.05)
        assert fanout.trouble(20) is None
        fanout.heartbeat = clock.now - 21
        assert "stuck" in (fanout.trouble(20) or "")
        fanout.heartbeat = clock.now
        fanout.down_since = clock.now - 29
        assert fanout.trouble(20) is None  # still within a stream's patience
        fanout.down_since = clock.now - 31
        assert "unreachable" in (fanout.trouble(20) or "")
        await fanout.stop()
        await client.aclose()

    run(scenario())


def test_caps_refuse_past_the_global_and_the_per_client_limit() -> None:
    metrics = StreamMetrics(CollectorRegistry())
    limits = StreamLimits(3, 2, metrics)
    a1, a2 = limits.admit("a"), limits.admit("a")
    refused = limits.admit("a")
    assert isinstance(refused, Refusal) and refused.reason == "per_client"
    b1 = limits.admit("b")
    full = limits.admit("c")
    assert isinstance(full, Refusal) and full.reason == "full"
    assert 5 <= full.retry_after_s <= 15
    for slot in (a1, a2, b1):
        assert isinstance(slot, Slot)
        slot.release()
        slot.release()  # twice is once
    assert limits.open == 0 and isinstance(limits.admit("c"), Slot)
    assert metrics.refused.labels("full")._value.get() == 1


@pytest.mark.parametrize(("cap", "fds", "expected"), [(10_000, 1024, 960), (100, 1024, 100)])
def test_the_fd_limit_lowers_the_cap(cap: int, fds: int, expected: int) -> None:
    assert effective_cap(cap, fds) == expected
