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
"""

from __future__ import annotations

import contextlib

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def close(self) -> None:
        if self._in_poll and not self.closed:
            with contextlib.suppress(Exception):  # the broker went away mid-BRPOP
                self._brpop_read()  # type: ignore[no-untyped-call]
            self._in_poll = False
        super().close()  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    Channel = Channel
