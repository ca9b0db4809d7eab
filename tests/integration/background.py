"""Slow scenarios that mostly wait — for leases to expire, at a provider's rate limit — start
when the integration session starts and run beside the other tests; the tests that ask for
them collect their outcomes. This keeps the suite's wall time near that of its busiest part
rather than the sum of its waits.

A scenario runs only when a selected test asks for it (``-k`` and file selection work as
usual), and never raises: what went wrong is in its outcome, for its test to report.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable
from typing import TypeVar

import pytest

_T = TypeVar("_T")

# Scenarios running at once: each starts a few worker processes, and the machine has two cores.
PARALLEL = 3


class Background:
    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=PARALLEL, thread_name_prefix="scenario"
        )

    def submit(self, fn: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        return self._pool.submit(fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


def asked_for(request: pytest.FixtureRequest, module: str, names: Iterable[str]) -> set[str]:
    """The scenarios, of ``names``, that the selected tests of ``module`` ask for: by their
    ``point`` or ``name`` parameter, or by the test's own name."""
    wanted = set(names)
    found = set()
    for item in request.session.items:
        if getattr(item, "module", None) is None or item.module.__name__ != module:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        for candidate in (params.get("point"), params.get("name"), item.originalname):
            if candidate in wanted:
                found.add(candidate)
    return found
