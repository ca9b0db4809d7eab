"""A job's events as an endless-until-final SSE stream that outlives quiet spells and Redis
restarts.

Each read is an ``XREAD BLOCK`` shorter than the client's socket timeout, so a quiet job is a
read that returns nothing, never a timeout. A lost connection is retried here, with backoff,
for as long as the browser stays connected, and reading resumes after the last id sent; the
response's own keep-alive comments carry on meanwhile, so the browser sees a quiet stream,
not an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sse_starlette import ServerSentEvent
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_never,
    wait_exponential,
)

from worker import constants as c
from worker.redis_endpoint import RedisEndpoint

log = structlog.get_logger(__name__)

# Shorter than the stream client's socket timeout (STREAM_SOCKET_TIMEOUT_S): a quiet spell is
# an empty reply, never a read that gives up.
STREAM_BLOCK_S = 5.0
STREAM_SOCKET_TIMEOUT_S = STREAM_BLOCK_S + 10.0
_READ_BATCH = 100
# Backoff while Redis is away: 0.1 s doubling up to 2 s, for as long as the client listens.
_BACKOFF = wait_exponential(multiplier=0.1, min=0.1, max=2.0)
# ASCII digits only (``\d`` would take any script's digits, which Redis refuses mid-stream).
_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_MAX_ID_PART = 2**64 - 1  # each part of a stream id is an unsigned 64-bit integer


def is_stream_id(text: str) -> bool:
    """A Redis Stream entry id, as this gateway sends them (``1700000000000-0``), in the range
    Redis accepts: anything else would pass here and fail inside the open stream."""
    parts = _STREAM_ID.fullmatch(text)
    if parts is None:
        return False
    ms, seq = (int(part) for part in parts.groups())
    # The very last id has nothing after it: Redis refuses a range that starts past it.
    return ms <= _MAX_ID_PART and seq <= _MAX_ID_PART and (ms, seq) != (_MAX_ID_PART, _MAX_ID_PART)


def is_final(message: dict[str, Any]) -> bool:
    return (
        message.get("event_type") == c.EVENT_STAGE_UPDATE
        and message.get("data", {}).get("status") in c.FINAL_STAGE_STATUSES
    )


# Compose's Redis user for the gateway may not run CLIENT SETINFO, which redis-py sends on each
# new connection (and ignores if refused): Redis 7.2 and later would log every refusal in its
# ACL log, where an operator looks for what the gateway was refused. It is not sent.
WITHOUT_CLIENT_SETINFO: dict[str, Any] = {"driver_info": None}


def stream_client(endpoint: RedisEndpoint) -> aioredis.Redis:
    """The client that blocks on job streams: its socket timeout outlasts every block. Through
    Sentinel, each reconnection asks where the primary is, so a stream follows a failover."""
    return endpoint.async_client(
        decode_responses=True,
        socket_timeout=STREAM_SOCKET_TIMEOUT_S,
        socket_connect_timeout=3,
        # Retrying is the stream's (below), with a backoff that lasts while the client does.
        retry=Retry(NoBackoff(), 0),
        **WITHOUT_CLIENT_SETINFO,
    )


class JobEventStream:
    """Reads one job's stream from a cursor (exclusive) and turns entries into SSE events."""

    def __init__(self, client: aioredis.Redis, job_id: str, after: str | None) -> None:
        self._redis = client
        self._job_id = job_id
        self._stream = c.events_stream(job_id)
        self.cursor = after or "0-0"
        self._lost = False

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """The history after the cursor, then live events, until the final ``stage_update``."""
        while True:
            for entry_id, message in await self._read():
                self.cursor = entry_id
                yield ServerSentEvent(data=message, id=entry_id)
                if is_final(_decode(message)):
                    return

    async def _read(self) -> list[tuple[str, str]]:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
            wait=_BACKOFF,
            stop=stop_never,
            before_sleep=self._note_lost,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                reply: Any = await self._redis.xread(
                    {self._stream: self.cursor},
                    count=_READ_BATCH,
                    block=int(STREAM_BLOCK_S * 1000),
                )
        if self._lost:
            self._lost = False
            log.info("redis_back", job_id=self._job_id, resumed_after=self.cursor)
        return [
            (str(entry_id), str((fields or {}).get("message", "{}")))
            for _, entries in reply or []
            for entry_id, fields in entries
        ]

    def _note_lost(self, state: RetryCallState) -> None:
        if not self._lost:
            self._lost = True
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "redis_lost",
                job_id=self._job_id,
                error=type(error).__name__,
                action="retrying with backoff; the stream stays open",
            )


def _decode(message: str) -> dict[str, Any]:
    try:
        decoded = json.loads(message)
    except ValueError:
        return {}
    return decoded if isinstance(decoded, dict) else {}
