"""The Redis broker transport, with one fix: a worker survives its broker going away while it
waits for messages.

When the connection drops during a ``BRPOP``, kombu 5.7's Redis channel raises out of its first
close (it tries to read the broken ``BRPOP``) before it marks itself closed. Celery then releases
the transport and closes the channel again, and that second close restores the unacked messages
through a transport that is gone: ``AttributeError: 'NoneType' object has no attribute
'hostname'``, "Unrecoverable error", and the worker exits — every worker that had a free slot
when Redis restarted or failed over. Here the read of a broken ``BRPOP`` while closing counts
as "nothing read", so the first close completes. The messages of running tasks stay in Redis's
unacked set (restored after the visibility timeout) and their leases bring them back sooner.

Two more pieces below: one Redis client per connection pool (``_OneSyncClient``), and, for the
test-only crash switch alone, no new ``BRPOP`` once a crash is under way
(``_TakesNoMoreBeforeACrash``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import crashpoints


class _ClosesAfterLostPoll:
    _in_poll: bool
    closed: bool

    def close(self) -> None:
        if self._in_poll and not self.closed:
            with contextlib.suppress(Exception):  # the broker went away mid-BRPOP
                self._brpop_read()  # type: ignore[attr-defined]
            self._in_poll = False
        super().close()  # type: ignore[misc]

    def queue_delete(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        # Closing deletes the channel's auto-delete fanout bindings (Celery's gossip and
        # control queues). With the broker gone (a failover under way) that raises out of
        # close() before the pools are released; the next close, from Celery, then fails
        # with a traceback. A binding left behind is the same one the worker makes again.
        if not getattr(self, "_closing", False):
            return super().queue_delete(queue, *args, **kwargs)  # type: ignore[misc]
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            return super().queue_delete(queue, *args, **kwargs)  # type: ignore[misc]
        return None


class _OneSyncClient:
    """kombu builds a new ``redis.Redis`` for every publish, event and unacked-set write
    (``conn_or_acquire``), and building one fills its table of reply callbacks: py-spy put it
    at 8 % of a worker's CPU on the path of a job (``bench/latency.py``). A client is only a
    handle on the channel's connection pool and is thread-safe, so one per pool is kept."""

    pool: Any

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        cached = self.__dict__.get("_sync_client")
        if cached is None or cached.connection_pool is not self.pool:
            cached = super()._create_client(asynchronous=False)  # type: ignore[misc]
            self.__dict__["_sync_client"] = cached
        return cached


# This process's channels (a forked pool process consumes nothing: it starts empty).
_CHANNELS: weakref.WeakSet[Any] = weakref.WeakSet()
_TAKING_NO_MORE = threading.Event()
os.register_at_fork(after_in_child=_CHANNELS.clear)


class _TakesNoMoreBeforeACrash:
    """The test-only crash switch (worker/crashpoints.py) kills where refgen's state is half
    written, not in kombu's window between a ``BRPOP`` and the unacked set (README:
    Reliability, "One window is the broker's"): before it kills, no new ``BRPOP`` is sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _CHANNELS.add(self)  # once, not on every BRPOP

    def _brpop_start(self, timeout: Any = None) -> Any:
        if _TAKING_NO_MORE.is_set():
            return None
        return super()._brpop_start(timeout)  # type: ignore[misc]


def _settle_before_a_crash(within_s: float = 2.0) -> None:
    """Stop asking the broker for messages, and wait until every ``BRPOP`` sent is read: the
    message it may have taken is then in the unacked set, where a death does not lose it."""
    _TAKING_NO_MORE.set()
    until = time.monotonic() + within_s
    while any(channel._in_poll for channel in list(_CHANNELS)) and time.monotonic() < until:
        time.sleep(0.005)


crashpoints.before_crash(_settle_before_a_crash)


class Channel(_TakesNoMoreBeforeACrash, _OneSyncClient, _ClosesAfterLostPoll, kombu_redis.Channel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(
    _TakesNoMoreBeforeACrash, _OneSyncClient, _ClosesAfterLostPoll, kombu_redis.SentinelChannel
):
    """The same, with the server found through Sentinel (README: Redis failover): a failover
    is a lost connection like a restart, and the reconnection asks the Sentinels again."""


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
