from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from worker.retirement import RetirementPolicy, memory_kb, process_tree
from worker.settings import Settings


class FakeMemory:
    def __init__(self, mb: float) -> None:
        self.mb, self.reads = mb, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.mb


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_off_by_default_never_retires_and_never_reads_memory() -> None:
    memory = FakeMemory(10_000)
    policy = RetirementPolicy(memory_mb=memory)
    assert not policy.enabled
    assert all(policy.task_taken(starts_job=True) is None for _ in range(1000))
    assert memory.reads == 0


def test_retires_once_when_it_takes_its_last_job() -> None:
    policy = RetirementPolicy(max_jobs=3, memory_mb=FakeMemory(80))
    taken = [policy.task_taken(starts_job=kind == "start") for kind in ["start", "image"] * 3]
    assert taken[:4] == [None] * 4  # images do not count as jobs
    retire = taken[4]
    assert retire is not None
    assert retire.jobs == 3 and retire.memory_mb == 80
    assert "3 jobs" in retire.reason and "WORKER_MAX_JOBS=3" in retire.reason
    assert taken[5] is None  # said once
    assert policy.task_taken(starts_job=True) is None


def test_retires_past_the_memory_bound_reading_memory_at_most_once_a_second() -> None:
    memory, clock = FakeMemory(100), FakeClock()
    policy = RetirementPolicy(max_memory_mb=120, memory_mb=memory, clock=clock)
    assert policy.task_taken(starts_job=False) is None
    memory.mb = 130
    clock.now = 0.5
    assert policy.task_taken(starts_job=False) is None  # not read again yet
    assert memory.reads == 1
    clock.now = 1.0
    retire = policy.task_taken(starts_job=False)
    assert retire is not None and retire.memory_mb == 130 and retire.jobs == 0
    assert "130 MB" in retire.reason and "WORKER_MAX_MEMORY_MB=120" in retire.reason
    assert memory.reads == 2


def test_memory_of_this_process_is_read_from_proc() -> None:
    assert process_tree(os.getpid())[0] == os.getpid()
    memory = memory_kb(os.getpid())
    assert 0 < memory.uss <= memory.pss <= memory.rss


def test_settings_read_the_limits_and_refuse_negative_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (Settings().worker_max_jobs, Settings().worker_max_memory_mb) == (0, 0)
    monkeypatch.setenv("WORKER_MAX_JOBS", "10000")
    monkeypatch.setenv("WORKER_MAX_MEMORY_MB", "512")
    assert (Settings().worker_max_jobs, Settings().worker_max_memory_mb) == (10000, 512)
    monkeypatch.setenv("WORKER_MAX_JOBS", "-1")
    with pytest.raises(ValidationError):
        Settings()
