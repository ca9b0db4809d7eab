"""Replicate's request budget, shared by every worker on every machine.

Replicate limits prediction creates (600 a minute) and, separately, every other API request
(3,000 a minute: polls, cancels, lists). Each limit here is a sliding-window log in Redis:
at most ``k`` requests in any window of ``60·k / per_minute`` seconds, ``k`` being a second's
worth, admitted by a Lua script on the server's clock so that two workers can never both take
the last slot. A window of about a second rather than a minute keeps the pace even: Replicate
allows only short bursts above its limits. Admissions are spaced by a small guard added to
the window, so the limit still holds where Replicate counts, after network jitter. A 429
sets a shared back-off for its kind of request that holds every worker, so adding workers
never turns into a storm of 429s.

The budget is enforced in an httpx transport that sits under the official client's own retry
transport: every request the client sends passes through it, including the GETs that client
silently retries after a 429. Downloads of outputs go to another host through another client
and are not API requests.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Final, Protocol

import httpx
import redis
import structlog

from worker import constants as c
from worker.errors import RateLimitedError
from worker.scripts import register

log = structlog.get_logger(__name__)

CREATE: Final = "creates"
OTHER: Final = "requests"

# httpx request extensions our transport reads: the caller's deadline (time.monotonic()) for
# waiting on the budget, and a create that the caller already admitted itself.
DEADLINE_EXTENSION: Final = "refgen.deadline"
ADMITTED_EXTENSION: Final = "refgen.admitted"
_DEFAULT_WAIT_S = 30.0

_CREATE_PATH = re.compile(r"/v1/(predictions|(models|deployments)/[^/]+/[^/]+/predictions)/?")


def window_for(per_minute: int) -> tuple[int, float]:
    """(limit, window seconds) with the same rate: a second's worth of requests, at least one."""
    limit = max(1, per_minute // 60)
    return limit, 60.0 * limit / per_minute


class RedisRateGate:
    """One limit, for every worker: at most ``limit`` admissions in any ``window_s``."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        limit: int,
        window_s: float = 1.0,
        guard_s: float = 0.05,
        kind: str = CREATE,
    ) -> None:
        self._redis = client
        self._limit = limit
        self._window_ms = int((window_s + guard_s) * 1000)
        self._keys = [c.replicate_limit_key(kind), c.replicate_backoff_key(kind)]
        self._kind = kind
        self._admit = register(client, "ratelimit_admit")
        self._back_off = register(client, "ratelimit_back_off")

    @classmethod
    def per_minute(cls, client: redis.Redis, per_minute: int, kind: str) -> RedisRateGate:
        limit, window_s = window_for(per_minute)
        return cls(client, limit=limit, window_s=window_s, kind=kind)

    def acquire(self, deadline_s: float) -> None:
        """Wait for a slot. Raises ``RateLimitedError`` (retryable) when none comes in time."""
        give_up = time.monotonic() + deadline_s
        waited = 0.0
        while True:
            wait_ms = int(
                self._admit(keys=self._keys, args=[self._limit, self._window_ms, uuid.uuid4().hex])
            )
            if wait_ms <= 0:
                if waited > 1.0:
                    log.info("rate_limit_waited", kind=self._kind, seconds=round(waited, 2))
                return
            pause = min(wait_ms / 1000, 1.0)
            if time.monotonic() + pause > give_up:
                raise RateLimitedError(
                    "Waited too long for the shared Replicate rate limit",
                    retry_after_s=wait_ms / 1000,
                )
            time.sleep(pause)
            waited += pause

    def back_off(self, seconds: float) -> None:
        """Hold every worker's requests of this kind for ``seconds`` (after a 429)."""
        request = c.replicate_backoff_request_key(self._kind, uuid.uuid4().hex)
        self._back_off(keys=[self._keys[1], request], args=[int(seconds * 1000)])
        log.warning("rate_limit_back_off", kind=self._kind, seconds=seconds)


class RateGate(Protocol):
    def acquire(self, deadline_s: float) -> None: ...

    def back_off(self, seconds: float) -> None: ...


class RequestBudget(Protocol):
    """Admits Replicate requests by kind (``CREATE`` or ``OTHER``)."""

    def admit(self, kind: str, until: float) -> None:
        """Wait for a slot until ``until`` (time.monotonic()); raises ``RateLimitedError``."""
        ...

    def back_off(self, kind: str, seconds: float) -> None: ...


class ReplicateBudget:
    """Both of Replicate's limits."""

    def __init__(self, creates: RateGate, requests: RateGate) -> None:
        self._gates = {CREATE: creates, OTHER: requests}

    @classmethod
    def in_redis(
        cls,
        client: redis.Redis,
        *,
        creates_per_minute: int = c.REPLICATE_CREATES_PER_MINUTE,
        requests_per_minute: int = c.REPLICATE_REQUESTS_PER_MINUTE,
    ) -> ReplicateBudget:
        return cls(
            RedisRateGate.per_minute(client, creates_per_minute, CREATE),
            RedisRateGate.per_minute(client, requests_per_minute, OTHER),
        )

    def admit(self, kind: str, until: float) -> None:
        self._gates[kind].acquire(until - time.monotonic())

    def back_off(self, kind: str, seconds: float) -> None:
        self._gates[kind].back_off(seconds)


class Unlimited:
    """No budget: for a generator built without Redis (a one-off script, a test)."""

    def admit(self, kind: str, until: float) -> None:
        return None

    def back_off(self, kind: str, seconds: float) -> None:
        return None


def request_kind(request: httpx.Request) -> str:
    is_create = request.method == "POST" and _CREATE_PATH.fullmatch(request.url.path)
    return CREATE if is_create else OTHER


def parse_retry_after(raw: str | None) -> float | None:
    """Seconds, capped at ``RETRY_AFTER_CAP_S`` wherever it is read: the shared back-off
    holds every worker's requests, and one long (or absurd) value must not stop them all."""
    try:
        seconds = float(raw) if raw is not None else None
    except ValueError:
        return None  # an HTTP date: rare from Replicate, and the 2 s default is safe
    if seconds is None or seconds != seconds:  # absent, or NaN
        return None
    return min(max(0.0, seconds), c.RETRY_AFTER_CAP_S)


class BudgetTransport(httpx.BaseTransport):
    """Every request to Replicate's API waits for its kind's budget; every 429 backs off that
    kind for everyone, for its ``Retry-After``."""

    def __init__(
        self,
        inner: httpx.BaseTransport,
        budget: RequestBudget,
        *,
        on_throttled: Callable[[], None] = lambda: None,
    ) -> None:
        self._inner = inner
        self._budget = budget
        self._on_throttled = on_throttled

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        kind = request_kind(request)
        if not request.extensions.get(ADMITTED_EXTENSION):
            until = request.extensions.get(DEADLINE_EXTENSION)
            self._budget.admit(kind, until or time.monotonic() + _DEFAULT_WAIT_S)
        response = self._inner.handle_request(request)
        if response.status_code == 429:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            self._on_throttled()
            wait = c.GENERATION_RETRY_DELAY_S if retry_after is None else retry_after
            self._budget.back_off(kind, wait)
        return response

    def close(self) -> None:
        self._inner.close()
