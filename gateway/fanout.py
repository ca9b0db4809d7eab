"""One reader per gateway process for every job someone watches (README: Scaling the gateway).

Every event leaves Redis in one atomic step (``announce`` in ``worker/lua/prelude.lua``):
appended to the job's stream, then published on the job's channel. The reader holds ONE
pub/sub connection, subscribed to the channels of the jobs being watched; a message there is
only a doorbell. On it, the reader reads every rung job's stream from its own cursor with one
non-blocking ``XREAD`` (one round trip for all the jobs rung meanwhile) and hands each entry,
framed as SSE bytes once, to each viewer's bounded queue. Redis connections are therefore a
few per process whatever the number of viewers, a lost pub/sub message costs nothing (the
stream is the truth), and after a reconnection every watched job is read from its cursor.

A viewer (``gateway/feed.py``) subscribes first, then replays the stream after its own cursor
with ``XRANGE``, then takes its queue, skipping ids it already sent: no gap, no duplicate.
A viewer whose queue is full is let go, never waited for; it catches up from the stream after
the last id it sent (``gateway/feed.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.stream_metrics import StreamMetrics
from worker import constants as c

log = structlog.get_logger(__name__)

_LOST = (RedisConnectionError, RedisTimeoutError, OSError)
# The reader wakes at least this often (a heartbeat for /healthz, a PING on a quiet line).
_LISTEN_S = 1.0
_PING_EVERY_S = 5.0
# Doorbells taken in one go before the streams are read; XREAD sizes.
_DOORBELLS_PER_ROUND = 2000
_STREAMS_PER_XREAD = 500
_ENTRIES_PER_STREAM = 100
_BACKOFF_MAX_S = 2.0
# Viewers replaying at once: a crowd connecting together waits its turn here, so the
# connections it takes from Redis stay few whatever the crowd.
_REPLAYS_AT_ONCE = 32
_CHANNEL_PREFIX = c.events_channel("")


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream id as something that orders like it (``"17-3"`` → ``(17, 3)``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def is_final(message: str) -> bool:
    """The job's last event: a ``stage_update`` with a final status."""
    if c.EVENT_STAGE_UPDATE not in message:  # cheap test first: most events are not
        return False
    try:
        decoded = json.loads(message)
    except ValueError:
        return False
    return (
        isinstance(decoded, dict)
        and decoded.get("event_type") == c.EVENT_STAGE_UPDATE
        and isinstance(decoded.get("data"), dict)
        and decoded["data"].get("status") in c.FINAL_STAGE_STATUSES
    )


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry, framed once for every viewer."""

    id: str
    key: tuple[int, int]
    frame: bytes
    final: bool

    @classmethod
    def of(cls, entry_id: str, message: str) -> Entry:
        data = "".join(f"data: {line}\r\n" for line in message.splitlines() or [""])
        frame = f"id: {entry_id}\r\n{data}\r\n".encode()
        return cls(entry_id, id_key(entry_id), frame, is_final(message))


def entries(reply: Any) -> list[Entry]:
    """``XRANGE``'s reply (decoded) as entries."""
    return [Entry.of(str(i), str((f or {}).get("message", "{}"))) for i, f in reply or []]


# Wakes a waiting viewer at shutdown; never sent.
_CLOSING = Entry("0-0", (0, 0), b"", final=True)


class Viewer:
    """One viewer's place in the fan-out: a bounded queue, and whether it was dropped."""

    __slots__ = ("dropped", "job_id", "queue", "ready")

    def __init__(self, job_id: str, size: int, ready: asyncio.Future[None]) -> None:
        self.job_id = job_id
        self.queue: asyncio.Queue[Entry] = asyncio.Queue(size)
        self.ready = ready  # done once the reader follows the job
        self.dropped = False


class _Job:
    __slots__ = ("cursor", "ready", "viewers")

    def __init__(self) -> None:
        self.viewers: set[Viewer] = set()
        self.cursor: str | None = None  # read up to here; None until subscribed
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Fanout:
    """The process's reader and its viewers. ``start`` it once, ``stop`` it at shutdown."""

    def __init__(
        self,
        redis: aioredis.Redis,
        metrics: StreamMetrics,
        *,
        queue_size: int,
        patience_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis  # decode_responses=True; commands only, never a blocking one
        self._metrics = metrics
        self._queue_size = queue_size
        self._patience_s = patience_s
        self._clock = clock
        self._jobs: dict[str, _Job] = {}
        self._rung: set[str] = set()
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self.heartbeat = clock()
        self.down_since: float | None = None
        self.closing = False
        self.replays = asyncio.Semaphore(_REPLAYS_AT_ONCE)

    # viewers -----------------------------------------------------------------------------

    def join(self, job_id: str) -> Viewer:
        """A viewer of ``job_id``. Once its ``ready`` is done, every entry after the stream's
        end at that moment reaches its queue (or drops it)."""
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _Job()
            if self._pubsub is not None:  # else the reader subscribes it when it connects
                channel = c.events_channel(job_id)
                asyncio.ensure_future(self._pubsub.subscribe(channel)).add_done_callback(
                    _ignore_outcome
                )
        viewer = Viewer(job_id, self._queue_size, job.ready)
        job.viewers.add(viewer)
        self._metrics.viewers.inc()
        return viewer

    def leave(self, viewer: Viewer) -> None:
        self._metrics.viewers.dec()
        job = self._jobs.get(viewer.job_id)
        if job is None:
            return
        job.viewers.discard(viewer)
        if not job.viewers:
            del self._jobs[viewer.job_id]
            self._rung.discard(viewer.job_id)
            if self._pubsub is not None:
                # An unsubscribe lost with the connection is moot: a new connection subscribes
                # only to the jobs still watched.
                channel = c.events_channel(viewer.job_id)
                asyncio.ensure_future(self._pubsub.unsubscribe(channel)).add_done_callback(
                    _ignore_outcome
                )

    def close(self) -> None:
        """The process is stopping: every viewer ends its stream now (its browser reconnects,
        to another gateway or to this one restarted), so shutdown does not wait for them."""
        self.closing = True
        for job in self._jobs.values():
            if not job.ready.done():
                job.ready.set_result(None)
            for viewer in job.viewers:
                viewer.dropped = True
                with contextlib.suppress(asyncio.QueueFull):
                    viewer.queue.put_nowait(_CLOSING)
            job.viewers.clear()

    # health ------------------------------------------------------------------------------

    def trouble(self, stuck_after_s: float) -> str | None:
        """Why streams would not flow now, or None: the reader gone or stuck, or Redis
        unreachable for longer than the patience a stream has for it."""
        now = self._clock()
        if self._task is None or self._task.done():
            return "the stream reader is not running"
        if now - self.heartbeat > stuck_after_s:
            return f"the stream reader has been stuck for {now - self.heartbeat:.0f} s"
        if self.down_since is not None and now - self.down_since > self._patience_s:
            return f"Redis has been unreachable for {now - self.down_since:.0f} s"
        return None

    # the reader --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-fanout")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Not ``await`` in a suppress(CancelledError): that would swallow a cancel of
            # the caller too.
            await asyncio.wait([self._task], timeout=5)
        await self._drop_pubsub()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._connect()
                self._back()
                backoff = 0.1
                while True:
                    await self._read_rung()
                    await self._listen()
            except _LOST as exc:
                self._lost(exc)
                await self._drop_pubsub()
                self.heartbeat = self._clock()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _connect(self) -> None:
        pubsub = self._redis.pubsub()
        # A placeholder channel: the connection is made (and checked) even with no job watched.
        await pubsub.subscribe(_CHANNEL_PREFIX)
        self._pubsub = pubsub
        watched = [c.events_channel(job_id) for job_id in self._jobs]
        for first in range(0, len(watched), _STREAMS_PER_XREAD):
            await pubsub.subscribe(*watched[first : first + _STREAMS_PER_XREAD])
        # Whatever was published while no connection listened is in the streams.
        self._rung.update(self._jobs)

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _listen(self) -> None:
        assert self._pubsub is not None
        quiet_since = self._clock()
        while not self._rung:
            message = await self._pubsub.get_message(timeout=_LISTEN_S)
            self.heartbeat = now = self._clock()
            if message is None:
                if now - quiet_since > _PING_EVERY_S:
                    await self._pubsub.ping()  # a dead line shows as an error, not silence
                    quiet_since = now
                continue
            quiet_since = now
            self._take(message)
            for _ in range(_DOORBELLS_PER_ROUND):
                more = await self._pubsub.get_message(timeout=0)
                if more is None:
                    break
                self._take(more)

    def _take(self, message: dict[str, Any]) -> None:
        channel = str(message.get("channel") or "")
        if not channel.startswith(_CHANNEL_PREFIX) or channel == _CHANNEL_PREFIX:
            return
        job_id = channel[len(_CHANNEL_PREFIX) :]
        job = self._jobs.get(job_id)
        if job is None:
            return
        if message["type"] == "message":
            self._rung.add(job_id)
        elif message["type"] == "subscribe" and not job.ready.done():
            asyncio.ensure_future(self._set_cursor(job_id, job)).add_done_callback(_ignore_outcome)

    async def _set_cursor(self, job_id: str, job: _Job) -> None:
        """Subscribed: read the job from its stream's end now; what came before is replayed
        by each viewer."""
        while job.cursor is None:
            try:
                last = await self._redis.xrevrange(c.events_stream(job_id), count=1)
            except _LOST:
                await asyncio.sleep(0.2)
                continue
            job.cursor = str(last[0][0]) if last else "0-0"
        if not job.ready.done():
            job.ready.set_result(None)
        self._rung.add(job_id)

    async def _read_rung(self) -> None:
        while self._rung:
            rung = [j for j in self._rung if (job := self._jobs.get(j)) and job.cursor]
            self._rung.clear()
            for first in range(0, len(rung), _STREAMS_PER_XREAD):
                batch = rung[first : first + _STREAMS_PER_XREAD]
                jobs = {c.events_stream(j): j for j in batch if j in self._jobs}
                cursors: dict[Any, Any] = {key: self._jobs[j].cursor for key, j in jobs.items()}
                if not cursors:
                    continue
                reply: Any = await self._redis.xread(cursors, count=_ENTRIES_PER_STREAM)
                self.heartbeat = self._clock()
                for stream, found in reply or []:
                    job_id = jobs[str(stream)]
                    self._dispatch(job_id, entries(found))
                    if len(found) == _ENTRIES_PER_STREAM:
                        self._rung.add(job_id)  # more where these came from

    def _dispatch(self, job_id: str, found: list[Entry]) -> None:
        job = self._jobs.get(job_id)
        if job is None or not found:
            return
        job.cursor = found[-1].id
        for entry in found:
            for viewer in list(job.viewers):
                try:
                    viewer.queue.put_nowait(entry)
                except asyncio.QueueFull:
                    # Never wait for one viewer: it catches up from the stream by itself.
                    viewer.dropped = True
                    job.viewers.discard(viewer)
                    self._metrics.dropped.inc()
            self._metrics.fanned_out.inc(len(job.viewers))

    def _lost(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = self._clock()
            log.warning(
                "redis_lost",
                error=type(exc).__name__,
                watched_jobs=len(self._jobs),
                action="the stream reader retries with backoff; streams stay open",
            )

    def _back(self) -> None:
        if self.down_since is not None:
            self.down_since = None
            log.info("redis_back", watched_jobs=len(self._jobs))


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it
