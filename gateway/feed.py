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
"""

from __future__ import annotations

import asyncio
import random
import time
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
_PING = b": ping\r\n\r\n"
# A browser reconnects this long after a stream ends (spread, so a wave of lifetimes ending
# together does not come back as one).
_RECONNECT_MS = (1000, 4000)
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(frozen=True)
class FeedOptions:
    keepalive_s: float
    lifetime_s: float
    write_timeout_s: float


class _Stalled(Exception):
    """The client stopped reading."""


class EventFeed:
    """The response to ``GET /jobs/{id}/events``; it owns ``slot`` and releases it."""

    def __init__(
        self,
        fanout: Fanout,
        redis: aioredis.Redis,
        metrics: StreamMetrics,
        options: FeedOptions,
        job_id: str,
        after: str | None,
        slot: Slot,
    ) -> None:
        self._fanout = fanout
        self._redis = redis
        self._metrics = metrics
        self._options = options
        self._job_id = job_id
        self._cursor = after or "0-0"
        self._slot = slot
        self._gone = False
        self._pinged = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            watcher = asyncio.ensure_future(self._watch(receive, asyncio.current_task()))
            try:
                await self._stream(send)
            except _Stalled:
                # Left unfinished: the server closes the connection; the client resumes.
                self._metrics.stalled.inc()
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._gone or task is None:
                    raise
                task.uncancel()  # the client left: nothing more to send
                return
            finally:
                watcher.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._slot.release()

    async def _watch(self, receive: Receive, streaming: asyncio.Task[object] | None) -> None:
        """Stops the stream when the client disconnects, even while it waits for events."""
        message: Message = {}
        while message.get("type") != "http.disconnect":
            message = await receive()
        self._gone = True
        if streaming is not None:
            streaming.cancel()

    async def _stream(self, send: Send) -> None:
        lifetime = self._options.lifetime_s * random.uniform(0.9, 1.0)
        ends = time.monotonic() + lifetime
        await self._write(send, f"retry: {random.randint(*_RECONNECT_MS)}\r\n\r\n".encode())
        while True:
            viewer = self._fanout.join(self._job_id)
            try:
                while not viewer.ready.done():  # the reader follows the job (Redis away?)
                    await self._wait_or_ping(send, asyncio.shield(viewer.ready))
                if await self._replay(send) or await self._follow(send, viewer, ends):
                    return
            finally:
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
            for entry in found:
                if await self._send_entry(send, entry):
                    return True
            if len(found) < _REPLAY_BATCH:
                return False
        return True

    async def _follow(self, send: Send, viewer: Viewer, ends: float) -> bool:
        """Live events from the viewer's queue; True when the stream is over (the final
        event, the end of its lifetime, the process stopping), False when it fell behind."""
        sent = id_key(self._cursor)
        while not viewer.dropped:
            left = ends - time.monotonic()
            if left <= 0:
                return True  # the client reconnects and resumes
            try:
                async with asyncio.timeout(min(left, self._options.keepalive_s)):
                    entry = await viewer.queue.get()
            except TimeoutError:
                if ends - time.monotonic() > 0:
                    await self._ping(send)
                continue
            if entry.key <= sent:
                continue  # replayed already
            if await self._send_entry(send, entry):
                return True
            sent = entry.key
        return self._fanout.closing

    async def _send_entry(self, send: Send, entry: Entry) -> bool:
        await self._write(send, entry.frame)
        self._cursor = entry.id
        return entry.final

    async def _wait_or_ping(self, send: Send, waited: asyncio.Future[object] | object) -> None:
        try:
            async with asyncio.timeout(self._options.keepalive_s):
                await waited  # type: ignore[misc]
        except TimeoutError:
            await self._ping(send)

    async def _ping(self, send: Send) -> None:
        await self._write(send, _PING)

    async def _write(self, send: Send, body: bytes) -> None:
        try:
            async with asyncio.timeout(self._options.write_timeout_s):
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except TimeoutError:
            log.info("stream_stalled", job_id=self._job_id, action="dropped; it may resume")
            raise _Stalled from None
