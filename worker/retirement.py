"""Retirement: a worker that has taken enough jobs, or grown past a memory bound, takes no more
work, finishes what it holds and exits cleanly, so that its supervisor starts a fresh one.

A safety net for growth nobody has found yet; nothing known grows per job (README: Long-running
workers). Off unless ``WORKER_MAX_JOBS`` or ``WORKER_MAX_MEMORY_MB`` is set. The Celery wiring
(``tasks/retire.py``) asks this policy once per task received and starts the warm shutdown.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (a prefork pool's children)."""
    found = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in children:
        found += process_tree(int(child))
    return found


class Memory(NamedTuple):
    """A process tree's memory in KiB. PSS shares each shared page among the processes that
    map it (as a container's limit counts it), so it moves when other processes start or stop
    on the machine; USS is the tree's private memory alone; RSS counts shared pages in full."""

    pss: int
    rss: int
    uss: int


_FIELDS = {"Pss:": "pss", "Rss:": "rss", "Private_Clean:": "uss", "Private_Dirty:": "uss"}


def memory_kb(pid: int) -> Memory:
    """The memory of ``pid`` and its children; zeros where /proc has no figures."""
    found = {"pss": 0, "rss": 0, "uss": 0}
    for proc in process_tree(pid):
        try:
            lines = Path(f"/proc/{proc}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue  # ended meanwhile, or no /proc
        for line in lines:
            name, _, rest = line.partition(" ")
            if name in _FIELDS:
                found[_FIELDS[name]] += int(rest.split()[0])
    return Memory(**found)


def worker_pss_mb() -> float:
    return memory_kb(os.getpid()).pss / 1024


@dataclass(frozen=True)
class Retire:
    """Why a worker retires, in words and figures for its log line."""

    reason: str
    jobs: int
    memory_mb: float


class RetirementPolicy:
    """Counts the jobs this worker took and watches its memory; says once when to retire.

    ``max_jobs`` and ``max_memory_mb`` of 0 are off. Memory is read at most once every
    ``check_every_s`` (a read of /proc costs about half a millisecond)."""

    def __init__(
        self,
        max_jobs: int = 0,
        max_memory_mb: int = 0,
        *,
        memory_mb: Callable[[], float] = worker_pss_mb,
        check_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_jobs, self.max_memory_mb = max_jobs, max_memory_mb
        self._memory_mb, self._check_every_s, self._clock = memory_mb, check_every_s, clock
        self._lock = threading.Lock()
        self._jobs = 0
        self._last_check = float("-inf")
        self._last_memory_mb = 0.0
        self._retiring = False

    @property
    def enabled(self) -> bool:
        return self.max_jobs > 0 or self.max_memory_mb > 0

    def task_taken(self, *, starts_job: bool) -> Retire | None:
        """Called for each task this worker takes; a ``Retire`` the first time a limit is
        reached, ``None`` otherwise (and every time after)."""
        if not self.enabled:
            return None
        with self._lock:
            if self._retiring:
                return None
            if starts_job:
                self._jobs += 1
            now = self._clock()
            if self.max_memory_mb and now - self._last_check >= self._check_every_s:
                self._last_check = now
                self._last_memory_mb = self._memory_mb()
            if self.max_jobs and self._jobs >= self.max_jobs:
                reason = f"took {self._jobs} jobs (WORKER_MAX_JOBS={self.max_jobs})"
            elif self.max_memory_mb and self._last_memory_mb >= self.max_memory_mb:
                reason = (
                    f"uses {self._last_memory_mb:.0f} MB "
                    f"(WORKER_MAX_MEMORY_MB={self.max_memory_mb})"
                )
            else:
                return None
            self._retiring = True
            memory = self._last_memory_mb if self.max_memory_mb else self._memory_mb()
            return Retire(reason=reason, jobs=self._jobs, memory_mb=round(memory, 1))
