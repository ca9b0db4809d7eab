"""The gateway's full collections come on its schedule, never when a crowd arrives: a full
pass stops every stream for as long as it scans (0.4–0.8 s at 10,000 streams)."""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any

import pytest

from gateway.garbage import ScheduledCollection


class Cycle:
    def __init__(self) -> None:
        self.me = self


def full_passes_during(work: Any) -> list[str]:
    """The phases of every full (generation 2) collection while ``work`` runs."""
    seen: list[str] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] == 2:
            seen.append(phase)

    gc.callbacks.append(note)
    try:
        work()
    finally:
        gc.callbacks.remove(note)
    return seen


def a_crowd_arrives() -> None:
    """Long-lived objects growing by far more than a quarter, as 10,000 streams opening do:
    Python's own rule starts full passes for it (sized by what this process holds)."""
    size = max(100_000, len(gc.get_objects()) // 2)
    crowd = [[i] for i in range(size)]
    for _ in range(2):
        crowd += [[i] for i in range(size)]
    del crowd


def test_a_crowd_arriving_starts_no_full_pass() -> None:
    assert full_passes_during(a_crowd_arrives)  # Python's own schedule: it does
    collection = ScheduledCollection(every_s=3600).start()
    try:
        assert full_passes_during(a_crowd_arrives) == []
    finally:
        collection.stop()
    assert gc.get_threshold()[2] < 1_000  # Python's own schedule is back


def test_one_schedule_per_process() -> None:
    first = ScheduledCollection(every_s=3600).start()
    try:
        with pytest.raises(RuntimeError, match="already"):
            ScheduledCollection(every_s=3600).start()
    finally:
        first.stop()
    ScheduledCollection().stop()  # never started: nothing to put back
    assert gc.get_threshold()[2] < 1_000


def test_the_scheduled_pass_frees_the_cycles_that_outlived_the_young_collections() -> None:
    collection = ScheduledCollection(every_s=0.1).start()
    try:
        left = Cycle()
        gc.collect(1)
        gc.collect(1)  # now in the oldest generation, which only a full pass scans
        gone = weakref.ref(left)
        del left
        passes = full_passes_during(lambda: wait_for(lambda: gone() is None))
        assert gone() is None and passes[:2] == ["start", "stop"]
    finally:
        collection.stop()


def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
