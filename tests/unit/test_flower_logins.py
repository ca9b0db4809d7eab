"""The count of wrong passwords that closes Flower to a guessing client (tasks/flower.py)."""

from __future__ import annotations

from tasks.flower import FailedLogins


def test_a_client_past_its_wrong_passwords_waits_out_its_window() -> None:
    failures = FailedLogins(per_window=3, window_s=60)
    for second in (0, 1, 2):
        assert failures.retry_after_s("10.0.0.1", now=second) is None
        failures.failed("10.0.0.1", now=second)
    assert failures.retry_after_s("10.0.0.1", now=10) == 50  # the window opened at 0
    assert failures.retry_after_s("10.0.0.2", now=10) is None  # another client is not
    assert failures.retry_after_s("10.0.0.1", now=60) is None
    failures.failed("10.0.0.1", now=61)  # a new window, counted from one
    assert failures.retry_after_s("10.0.0.1", now=62) is None


def test_wrong_passwords_spread_out_are_never_stopped() -> None:
    failures = FailedLogins(per_window=3, window_s=60)
    for minute in range(10):
        for second in (0, 1):
            failures.failed("10.0.0.1", now=minute * 60 + second)
        assert failures.retry_after_s("10.0.0.1", now=minute * 60 + 2) is None


def test_a_crowd_of_addresses_cannot_grow_the_count_without_bound() -> None:
    failures = FailedLogins(per_window=1, window_s=60, max_clients=100)
    for n in range(1000):
        failures.failed(f"10.0.{n // 256}.{n % 256}", now=0)
    assert len(failures._windows) == 100
    assert failures.retry_after_s("10.0.3.231", now=1) == 59  # the latest are kept
