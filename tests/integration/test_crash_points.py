"""The crash campaign: a worker dies at every point where it leaves state half-written, and
every job still ends exactly once, with the right result, paid once, leaving nothing held.

Each scenario (``crash_scenarios.py``) has its own cluster: a redis-server, a Replicate-like
server and real workers. A test-only switch (``worker.crashpoints``) makes a worker SIGKILL its
own process group at a named point; a second worker with the same environment stands by (a fuse
file lets the switch fire once). Other scenarios kill, freeze or cut off workers from outside.
The scenarios mostly wait (for leases to expire), so they start with the session and run beside
the other tests (``conftest.campaign``); each is a test of its own, and a failing check prints
the whole story of its job (``campaign.Report.describe``).
"""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.integration.campaign import Report, check_invariants
from tests.integration.crash_scenarios import POINTS, RETRY_POINTS, SPECIAL, WATCHDOG_POINTS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def report_of(campaign: dict[str, concurrent.futures.Future[Report]], name: str) -> Report:
    report = campaign[name].result(timeout=380)
    print(f"\n{report.describe()}")
    return report


@pytest.mark.parametrize("point", POINTS + RETRY_POINTS)
def test_a_worker_killed_at(point: str, campaign) -> None:
    report = report_of(campaign, point)
    assert report.crashed, f"the crash point {point} was never reached\n{report.describe()}"
    check_invariants(report, expected_status="success")
    if point in RETRY_POINTS:
        rooftop = [o for k, o in report.outcomes.items() if k == "scene_rooftop"]
        assert rooftop and rooftop[0].retry_count == 1, report.describe()


@pytest.mark.parametrize("point", WATCHDOG_POINTS)
def test_a_watchdog_killed_at(point: str, campaign) -> None:
    report = report_of(campaign, point)
    assert report.crashed, f"the crash point {point} was never reached\n{report.describe()}"
    check_invariants(report, expected_status="success")


@pytest.mark.parametrize("point", ["watchdog.resend"])
def test_a_broker_error_in_the_watchdogs_resend_is_logged_and_retried(point: str, campaign) -> None:
    report = report_of(campaign, point)
    assert report.crashed, f"the failure was never injected\n{report.describe()}"
    assert any("resend failures logged: 1" in n for n in report.notes), report.describe()
    check_invariants(report, expected_status="success")


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_the_job_survives(name: str, campaign) -> None:
    report = report_of(campaign, name)
    check_invariants(report, expected_status="success", live_may_miss=name.startswith("redis"))
