"""The image deadline: one attempt at one image ends within ``IMAGE_TIMEOUT_S``, its generation,
download, upload and signed link together.

The pipeline opens an ``attempt_deadline`` around an attempt; every HTTP call made inside it
goes through ``BoundedTimeoutTransport``, which cuts each request's timeouts to the time left,
and the storage retry policy stops when the time is up. A frozen server therefore costs an
attempt its deadline, never a multiple of the HTTP timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpx

_deadline: ContextVar[float | None] = ContextVar("refgen_attempt_deadline", default=None)
# Below this, a request could not even connect: it fails at once instead.
_MIN_REQUEST_S = 0.05


@contextmanager
def attempt_deadline(seconds: float) -> Iterator[None]:
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left in the current attempt, or None outside one."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


class BoundedTimeoutTransport(httpx.HTTPTransport):
    """Gives every request a timeout: its own, or ``default`` where the caller passed none (the
    replicate client sends ``timeout=None`` on creates, which httpx reads as "wait forever"),
    never longer than the time left in the current attempt."""

    def __init__(self, default: httpx.Timeout, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._default = default.as_dict()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        current = request.extensions.get("timeout") or {}
        timeouts = dict(current)
        if all(value is None for value in current.values()):
            timeouts = dict(self._default)
        left = remaining()
        if left is not None:
            if left < _MIN_REQUEST_S:
                raise httpx.ConnectTimeout("the image's deadline has passed", request=request)
            timeouts = {k: left if v is None else min(v, left) for k, v in timeouts.items()}
        request.extensions["timeout"] = timeouts
        return super().handle_request(request)
