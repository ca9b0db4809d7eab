"""How many event streams one gateway process takes (README: Scaling the gateway).

A global cap (``GATEWAY_MAX_STREAMS``, lowered to what the process's file-descriptor limit
allows) and a cap per client address (``GATEWAY_MAX_STREAMS_PER_CLIENT``). Past either, the
stream is refused with 503 and a ``Retry-After`` spread over a few seconds, so refused
clients do not all come back at once; the streams already open are untouched.
"""

from __future__ import annotations

import random
import resource
from collections import Counter
from dataclasses import dataclass

import structlog

from gateway.stream_metrics import StreamMetrics

log = structlog.get_logger(__name__)

# File descriptors kept for everything but client sockets: Redis, logs, the store, a spare.
FD_RESERVE = 64
RETRY_AFTER_S = (5, 15)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def effective_cap(max_streams: int, fd_limit: int) -> int:
    """The global cap the fd limit allows: one descriptor per stream, a reserve for the rest."""
    return max(1, min(max_streams, fd_limit - FD_RESERVE))


@dataclass(frozen=True)
class Refusal:
    reason: str  # "full" | "per_client"
    detail: str
    retry_after_s: int


class Slot:
    """One open stream's place; ``release`` exactly once when the stream ends."""

    __slots__ = ("_client", "_limits")

    def __init__(self, limits: StreamLimits, client: str) -> None:
        self._limits = limits
        self._client: str | None = client

    def release(self) -> None:
        if self._client is not None:
            self._limits._release(self._client)
            self._client = None


class StreamLimits:
    def __init__(self, max_streams: int, per_client: int, metrics: StreamMetrics) -> None:
        self.max_streams = max_streams
        self.per_client = per_client
        self._metrics = metrics
        self._open = 0
        self._by_client: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return self._open

    def admit(self, client: str) -> Slot | Refusal:
        if self._open >= self.max_streams:
            return self._refuse(
                "full", f"this gateway holds its maximum of {self.max_streams} event streams"
            )
        if self._by_client[client] >= self.per_client:
            return self._refuse(
                "per_client",
                f"at most {self.per_client} event streams are served to one client at once",
            )
        self._open += 1
        self._by_client[client] += 1
        self._metrics.open_streams.set(self._open)
        return Slot(self, client)

    def _refuse(self, reason: str, detail: str) -> Refusal:
        self._metrics.refused.labels(reason).inc()
        return Refusal(reason, f"{detail}; retry later", random.randint(*RETRY_AFTER_S))

    def _release(self, client: str) -> None:
        self._open -= 1
        self._by_client[client] -= 1
        if self._by_client[client] <= 0:
            del self._by_client[client]
        self._metrics.open_streams.set(self._open)
