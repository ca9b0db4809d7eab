"""The gateway's garbage collection: young generations as Python runs them, full passes on a
schedule.

A full pass scans every object the process holds: with 10,000 open streams, 0.4-0.8 s during
which no stream is served (README: Scaling the gateway). Python starts one whenever the
objects that outlived two young collections have grown by a quarter since the last, which a
crowd arriving does again and again; one such pass early in a bench's flow put its p99 delay
at 0.8-1 s. A stream's objects are freed by reference counting when it ends; what only a full
pass frees is the few cycles that outlived the young collections (a closed connection's
asyncio transport, about a kilobyte, is one). So here the young generations are collected as
Python does, and the full pass runs every ``FULL_PASS_EVERY_S`` (5 minutes), logged with its
pause: one stop every five minutes, which a p99 does not see. (Python 3.14's incremental
collector ignores the oldest generation's threshold and has no such long pause to avoid.)
"""

from __future__ import annotations

import gc
import threading
import time

import structlog

log = structlog.get_logger(__name__)

FULL_PASS_EVERY_S = 300.0
# gc.set_threshold takes a C int: a full pass then never comes due by itself.
_NEVER = 2**31 - 1


_started = threading.Lock()  # one schedule per process


class ScheduledCollection:
    """For the gateway process: what is loaded at start is frozen out of every pass, full
    passes no longer come due by themselves, and a thread runs one every ``every_s``.
    ``stop`` puts Python's own schedule back (for tests, which share their process)."""

    def __init__(self, every_s: float = FULL_PASS_EVERY_S) -> None:
        self._every_s = every_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-full-gc", daemon=True)
        self._threshold: tuple[int, int, int] | None = None

    def start(self) -> ScheduledCollection:
        if not _started.acquire(blocking=False):
            raise RuntimeError("full collections are already on a schedule in this process")
        self._threshold = gc.get_threshold()
        gc.freeze()
        young, middle, _ = self._threshold
        gc.set_threshold(young, middle, _NEVER)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._threshold is None:
            return
        self._stopped.set()
        self._thread.join()
        gc.set_threshold(*self._threshold)
        gc.unfreeze()
        self._threshold = None
        _started.release()

    def _run(self) -> None:
        while not self._stopped.wait(self._every_s):
            started = time.perf_counter()
            collected = gc.collect()
            log.info(
                "gc_full_pass",
                pause_ms=round((time.perf_counter() - started) * 1000, 1),
                collected=collected,
            )
