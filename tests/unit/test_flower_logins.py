"""The count of wrong passwords that closes Flower to a guessing client (tasks/flower.py)."""

from __future__ import annotations

import pytest

from tasks.flower import FailedLogins, check_credentials, client_of
from worker.errors import ConfigurationError
from worker.settings import Settings


def test_a_client_past_its_wrong_passwords_waits_out_its_window() -> None:
    failures = FailedLogins(per_window=3, window_s=60)
    stops = []
    for second in (0, 1, 2):
        assert failures.retry_after_s("10.0.0.1", now=second) is None
        stops.append(failures.failed("10.0.0.1", now=second))
    assert stops == [False, False, True]  # the third stops it: logged once
    assert failures.retry_after_s("10.0.0.1", now=10) == 50  # the window opened at 0
    assert failures.retry_after_s("10.0.0.2", now=10) is None  # another client is not
    assert failures.retry_after_s("10.0.0.1", now=60) is None
    failures.failed("10.0.0.1", now=60.5)  # 1 and 2 are still within the minute: three
    assert failures.retry_after_s("10.0.0.1", now=60.7) == pytest.approx(0.3)
    assert failures.retry_after_s("10.0.0.1", now=61.1) is None


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
    assert len(failures._failures) == 100
    assert failures.retry_after_s("10.0.3.231", now=1) == 59  # the latest are kept


def test_a_client_is_its_connections_address_an_ipv6_one_by_its_64() -> None:
    assert client_of(("203.0.113.7", 50000), fallback="198.51.100.1") == "203.0.113.7"
    assert client_of(("::ffff:203.0.113.7", 50000, 0, 0), fallback="") == "203.0.113.7"
    one = client_of(("2001:db8:1:2::1", 50000, 0, 0), fallback="")
    assert one == client_of(("2001:db8:1:2:ffff::9", 1, 0, 0), fallback="") == "2001:db8:1:2::/64"
    assert client_of(("2001:db8:1:3::1", 1, 0, 0), fallback="") != one
    assert client_of("", fallback="198.51.100.1") == "198.51.100.1"  # a unix socket


def test_no_more_than_the_limit_in_any_minute_not_even_across_a_boundary() -> None:
    failures = FailedLogins(per_window=3, window_s=60)
    for second in (0, 59.5, 59.6):
        failures.failed("10.0.0.1", now=second)
    assert failures.retry_after_s("10.0.0.1", now=60.1) is None  # 0 has left the minute
    failures.failed("10.0.0.1", now=60.1)
    assert failures.retry_after_s("10.0.0.1", now=61) == pytest.approx(58.5)


def test_a_quiet_client_is_forgotten_before_one_still_stopped() -> None:
    failures = FailedLogins(per_window=1, window_s=60, max_clients=2)
    failures.failed("10.0.0.1", now=0)  # stopped until 60
    failures.failed("10.0.0.2", now=-100)  # long quiet
    failures.failed("10.0.0.3", now=1)
    assert failures.retry_after_s("10.0.0.1", now=2) == 58


def test_a_credential_that_is_not_ascii_is_refused_at_start() -> None:
    with pytest.raises(ConfigurationError, match="#2 must be ASCII"):
        check_credentials(Settings(flower_basic_auth="ops:S3cret-pw,bob:pässwort"), [])
