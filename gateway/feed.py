"""One viewer's event stream, as an ASGI response (README: Scaling the gateway).

The viewer joins the fan-out first (``gateway/fanout.py``), then replays the job's stream
after its cursor (``Last-Event-ID``) with ``XRANGE``, then follows its queue, skipping what it
already sent: so replay and resume are exact. A viewer whose queue overflowed is let go by
the fan-out; it catches up from the stream after the last id it sent, at its client's pace,
and joins again. The stream ends after the job's final event, at the end of its lifetime,
when the process stops, or when its client stops reading for ``GATEWAY_WRITE_TIMEOUT_S``;
a browser then reconnects by itself with ``Last-Event-ID`` and carries on. Keep-alive
comments fill quiet spells, and a Redis that is away is waited for, however long the client
stays.

Time is kept for every feed by one task (``FeedTimer``), not a timer per event: at ten
thousand streams, a timer armed and cancelled around every wait and every write is a large
share of the gateway's work.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import Message, Receive, Scope, Send

from gateway.fanout import Entry, Fanout, Viewer, entries, id_key
from gateway.limits import Slot
from gateway.stream_metrics import StreamMetrics
from worker import constants as c

log = structlog.get_logger(__name__)

_REPLAY_BATCH = 100
# Entries written in one go when a viewer has several waiting.
_COALESCE = 64
_TICK_S = 0.5
# A browser reconnects this long after a stream ends (spread, so a wave of lifetimes ending
# together does not come back as one).
_RECONNECT_MS = (1000, 4000)
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]
# Put in a following viewer's queue by the timer; never sent as such.
_PING = Entry("ping", (0, 0), b": ping\r\n\r\n", final=False)
_END = Entry("end", (0, 0), b"", final=True)


@dataclass(frozen=True)
class FeedOptions:
    keepalive_s: float
    lifetime_s: float
    write_timeout_s: float


class FeedTimer:
    """Keep-alives, lifetimes and stalled writes of every open feed, on one task."""

    def __init__(self, options: FeedOptions) -> None:
        self.options = options
        self._feeds: set[EventFeed] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-feed-timer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Not ``await`` in a suppress(CancelledError): that would swallow a cancel of
            # the caller too.
            await asyncio.wait([self._task], timeout=5)

    def add(self, feed: EventFeed) -> None:
        self._feeds.add(feed)

    def discard(self, feed: EventFeed) -> None:
        self._feeds.discard(feed)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(min(_TICK_S, self.options.keepalive_s / 2))
            now = time.monotonic()
            for feed in list(self._feeds):
                feed.tick(now)


class EventFeed:
    """The response to ``GET /jobs/{id}/events``; it owns ``slot`` and releases it."""

    def __init__(
        self,
        fanout: Fanout,
        timer: FeedTimer,
        redis: aioredis.Redis,
        metrics: StreamMetrics,
        job_id: str,
        after: str | None,
        slot: Slot,
    ) -> None:
        self._fanout = fanout
        self._timer = timer
        self._options = timer.options
        self._redis = redis
        self._metrics = metrics
        self._job_id = job_id
        self._cursor = after or "0-0"
        self._slot = slot
        now = time.monotonic()
        self._ends = now + self._options.lifetime_s * random.uniform(0.9, 1.0)
        self._written_at = now
        self._writing_since: float | None = None
        self._following: Viewer | None = None
        self._task: asyncio.Task[object] | None = None
        self._stop: str | None = None  # why the task was cancelled: "gone" | "stalled"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._task = asyncio.current_task()
        watcher = asyncio.ensure_future(self._watch(receive))
        self._timer.add(self)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            await self._stream(send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if self._stop is None or self._task is None:
                raise
            self._task.uncancel()
            if self._stop == "stalled":
                # Left unfinished: the server closes the connection; the client resumes.
                self._metrics.stalled.inc()
                log.info("stream_stalled", job_id=self._job_id, action="closed; it may resume")
        finally:
            self._timer.discard(self)
            watcher.cancel()
            self._slot.release()

    async def _watch(self, receive: Receive) -> None:
        """Stops the stream when the client disconnects, even while it waits for events."""
        message: Message = {}
        while message.get("type") != "http.disconnect":
            message = await receive()
        self._cancel("gone")

    def _cancel(self, why: str) -> None:
        if self._stop is None and self._task is not None:
            self._stop = why
            self._task.cancel()

    def tick(self, now: float) -> None:
        """The timer's round: a write stuck too long, a lifetime over, a keep-alive due."""
        if self._writing_since is not None:
            if now - self._writing_since > self._options.write_timeout_s:
                self._cancel("stalled")
            return
        viewer = self._following
        if viewer is None:
            return  # replaying or waiting for Redis: it keeps its own time meanwhile
        due = now >= self._ends or now - self._written_at >= self._options.keepalive_s
        if due and viewer.queue.empty():
            viewer.queue.put_nowait(_END if now >= self._ends else _PING)

    async def _stream(self, send: Send) -> None:
        await self._write(send, f"retry: {random.randint(*_RECONNECT_MS)}\r\n\r\n".encode())
        while True:
            viewer = self._fanout.join(self._job_id)
            try:
                while not viewer.ready.done():  # the reader follows the job (Redis away?)
                    await self._wait_or_ping(send, asyncio.shield(viewer.ready))
                if await self._replay(send) or await self._follow(send, viewer):
                    return
            finally:
                self._following = None
                self._fanout.leave(viewer)
            # Fell behind: the fan-out let this viewer go rather than wait for it. It catches
            # up from the stream at its own pace, and joins again.

    async def _replay(self, send: Send) -> bool:
        """The stream after the cursor; True when the stream is over (the final event sent,
        or the process stopping)."""
        backoff = 0.1
        while not self._fanout.closing:
            low = "-" if self._cursor == "0-0" else f"({self._cursor}"
            try:
                async with self._fanout.replays:
                    reply = await self._redis.xrange(
                        c.events_stream(self._job_id), min=low, max="+", count=_REPLAY_BATCH
                    )
            except (RedisConnectionError, RedisTimeoutError):
                # The reader says so in the log, once for the process.
                await self._wait_or_ping(send, asyncio.sleep(backoff))
                backoff = min(backoff * 2, 2.0)
                continue
            found = entries(reply)
            if await self._send_entries(send, found):
                return True
            if len(found) < _REPLAY_BATCH:
                return False
        return True

    async def _follow(self, send: Send, viewer: Viewer) -> bool:
        """Live events from the viewer's queue; True when the stream is over (the final
        event, the end of its lifetime, the process stopping), False when it fell behind."""
        sent = id_key(self._cursor)
        self._following = viewer
        while not viewer.dropped:
            batch = [await viewer.queue.get()]
            while len(batch) < _COALESCE and not viewer.queue.empty():
                batch.append(viewer.queue.get_nowait())
            fresh = []
            for entry in batch:
                if entry is _END:
                    return True  # lifetime over: the client reconnects and resumes
                if entry is _PING or entry.key > sent:  # else replayed already
                    fresh.append(entry)
                    sent = max(sent, entry.key)
            if await self._send_entries(send, fresh):
                return True
        return self._fanout.closing

    async def _send_entries(self, send: Send, found: list[Entry]) -> bool:
        """Writes entries up to the job's final one; True when that was among them."""
        for count, entry in enumerate(found, 1):
            if entry.final:
                found = found[:count]
                break
        if not found:
            return False
        await self._write(send, b"".join(entry.frame for entry in found))
        last = next((e for e in reversed(found) if e is not _PING), None)
        if last is not None:
            self._cursor = last.id
        return found[-1].final

    async def _wait_or_ping(self, send: Send, waited: Awaitable[object]) -> None:
        try:
            async with asyncio.timeout(self._options.keepalive_s):
                await waited
        except TimeoutError:
            await self._write(send, _PING.frame)

    async def _write(self, send: Send, body: bytes) -> None:
        self._writing_since = time.monotonic()
        await send({"type": "http.response.body", "body": body, "more_body": True})
        self._writing_since = None
        self._written_at = time.monotonic()
