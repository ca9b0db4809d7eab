"""Writes that must outlive a Redis failover (README: Redis failover).

Redis replicates asynchronously: a write the primary acknowledged can be missing on the replica
that Sentinel (or a managed service) promotes when the primary is lost. For the writes whose
loss would cost money or a result (a charge, an outcome, a prediction's intent and id, a job's
plan, its committed result) the write and a ``WAIT`` for a replica go to Redis in one pipeline,
on one connection:

- the ``WAIT`` answers once a replica holds the write, so a failover after it keeps the write;
- if the connection breaks before the ``WAIT`` answers (the primary died), redis-py's retry sends
  the whole pipeline again, to whichever primary answers now. Every such write is idempotent
  (keyed by image, prediction or job), so writing it again is safe and restores it if it was lost.

A ``WAIT`` sent on its own, after the write, could not tell the two apart: retried on a new
connection it would wait on the new primary, for writes that connection never made.

Writes wait only while the primary has a replica connected (it says so in ``INFO
replication``, read at most once a second): a primary left alone after a failover cannot be
waited on, and waiting would only slow every write by the timeout. A ``WAIT`` that times out
(a replica connected but lagging) is not an error: the write is on the primary, which still
answers; it is logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog
from redis.client import Pipeline
from redis.exceptions import NoScriptError, ResponseError

log = structlog.get_logger(__name__)

# How long what the primary said about its replicas is trusted.
_REPLICAS_FRESH_S = 1.0
# One warning per this long while a replica lags, not one per write.
_WARN_EVERY_S = 10.0
# A pipeline re-sent to a new primary finds its scripts missing from that server's cache.
_NOSCRIPT_ATTEMPTS = 3


class Replication:
    """Takes a ready-made client. ``replicas=0`` (one Redis, no replica): writes do not wait."""

    def __init__(self, client: redis.Redis, *, replicas: int = 0, timeout_ms: int = 1000) -> None:
        self._redis = client
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self._lock = threading.Lock()
        self._connected = 0
        self._checked_at = -_REPLICAS_FRESH_S
        self._warned_at = -_WARN_EVERY_S

    def write(self, what: str, build: Callable[[Pipeline], object]) -> list[Any]:
        """Run the commands ``build`` queues on a pipeline, confirmed on a replica when there
        is one. Returns their replies. ``build`` must queue idempotent writes only."""
        wanted = self._replicas_to_wait_for()
        for attempt in range(_NOSCRIPT_ATTEMPTS):
            pipe = self._redis.pipeline(transaction=False)
            build(pipe)
            if attempt == 0:
                # The scripts are sent as they are: redis-py would otherwise ask SCRIPT EXISTS
                # before every pipeline that holds one, a round trip more for each write on
                # an image's path. The worker loads every script at start; one the server
                # lacks (restarted, or a replica just promoted) is loaded by the next attempt.
                pipe.scripts.clear()
            if wanted:
                pipe.wait(wanted, self.timeout_ms)
            replies = pipe.execute(raise_on_error=False)
            writes, waited = (replies[:-1], replies[-1]) if wanted else (replies, None)
            failed = [reply for reply in writes if isinstance(reply, Exception)]
            missing_script = any(isinstance(e, NoScriptError) for e in failed)
            if missing_script and attempt + 1 < _NOSCRIPT_ATTEMPTS:
                continue  # this time execute() loads the missing scripts before it sends
            if failed:
                raise failed[0]
            if isinstance(waited, ResponseError):
                self._cannot_wait(f"the server refused WAIT: {waited}")
            elif waited is not None and int(waited) < wanted:
                self._unconfirmed(what, int(waited), wanted)
            return writes
        raise AssertionError("unreachable")

    def _replicas_to_wait_for(self) -> int:
        if self.replicas <= 0:
            return 0
        now = time.monotonic()
        with self._lock:
            fresh = now - self._checked_at < _REPLICAS_FRESH_S
            connected = self._connected
        if not fresh:
            try:
                connected = int(self._redis.info("replication").get("connected_slaves", 0))
            except ResponseError as exc:  # a managed service that hides its replication
                self._cannot_wait(f"the server refused INFO replication: {exc}")
                return 0
            with self._lock:
                self._connected, self._checked_at = connected, now
        return min(self.replicas, connected)

    def _cannot_wait(self, why: str) -> None:
        self.replicas = 0
        log.warning(
            "replication_wait_unavailable",
            reason=why,
            action="writes no longer wait for a replica (set REDIS_WAIT_REPLICAS=0)",
        )

    def _unconfirmed(self, what: str, confirmed: int, wanted: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._checked_at = -_REPLICAS_FRESH_S  # ask the primary again next time
            if now - self._warned_at < _WARN_EVERY_S:
                return
            self._warned_at = now
        log.warning(
            "replication_unconfirmed",
            write=what,
            replicas=confirmed,
            wanted=wanted,
            timeout_ms=self.timeout_ms,
            action="went on: the write is on the primary; a replica lags",
        )
