"""The shared create limit, against a real redis-server (its Lua and clock are the point)."""

from __future__ import annotations

import threading
import time

import pytest

from worker.errors import RateLimitedError
from worker.ratelimit import BACKOFF, CREATES, RedisRateGate


@pytest.fixture(autouse=True)
def clean(redis_client) -> None:
    redis_client.delete(CREATES, BACKOFF)


def test_no_more_than_the_limit_in_any_window_across_threads(redis_client) -> None:
    admitted: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        gate = RedisRateGate(redis_client, limit=5, window_s=0.5, guard_s=0.02)
        for _ in range(3):
            gate.acquire(deadline_s=10)
            with lock:
                admitted.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    admitted.sort()
    assert len(admitted) == 18
    for i, start in enumerate(admitted):
        in_window = [t for t in admitted[i:] if t < start + 0.5]
        assert len(in_window) <= 5
    assert admitted[-1] - admitted[0] >= 1.0  # 18 creates at 5 per 0.5 s need 3 windows


def test_back_off_holds_everyone(redis_client) -> None:
    gate = RedisRateGate(redis_client, limit=100)
    gate.back_off(0.6)
    started = time.monotonic()
    RedisRateGate(redis_client, limit=100).acquire(deadline_s=5)  # another worker
    assert time.monotonic() - started >= 0.5


def test_gives_up_retryably_past_its_deadline(redis_client) -> None:
    gate = RedisRateGate(redis_client, limit=1, window_s=10)
    gate.acquire(deadline_s=1)
    with pytest.raises(RateLimitedError) as info:
        gate.acquire(deadline_s=0.2)
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 1
