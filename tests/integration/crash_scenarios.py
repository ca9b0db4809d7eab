"""The crash campaign's scenarios (``test_crash_points.py``): a worker dies at every point where
it leaves state half-written, or is killed, frozen or cut off from outside. Each scenario has its
own cluster (``campaign.Cluster``) and returns a ``campaign.Report``; ``scenarios`` builds them
all, for the session fixture that runs them side by side (``conftest.campaign``).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes._http import Fault
from tests.fakes.replicate_server import PredictionPlan
from tests.integration.campaign import (
    LEASE_TTL_S,
    Cluster,
    Report,
    collect,
    send,
    wait_for,
)
from worker import constants as c
from worker import crashpoints

ROOFTOP = "Windswept rooftop"  # only the rooftop scene's prompt contains it
# Every point the switch knows (worker/crashpoints.py), by the way its scenario reaches it.
RETRY_POINTS = [p for p in crashpoints.POINTS if p.startswith("image.after_retry")]
WATCHDOG_POINTS = [p for p in crashpoints.POINTS if p.startswith("watchdog.after")]
POINTS = [
    p
    for p in crashpoints.POINTS
    if p.startswith(("start.", "image.", "finalize.")) and p not in RETRY_POINTS
]


def start_workers(cluster: Cluster, names: list[str], **env: str) -> None:
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            cluster.start_worker(name, **env)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def exited(cluster: Cluster) -> list[str]:
    return [n for n, w in cluster.workers.items() if w.process and w.process.poll() is not None]


def leases_held(cluster: Cluster) -> int:
    return int(cluster.redis.zcard(c.LEASES))


def crash_at(point: str, tmp: Path, plan: dict[str, Any]) -> Callable[[Report], None]:
    """Both workers carry the switch; whichever reaches the point first dies there."""

    def body(report: Report) -> None:
        cluster = Cluster(tmp, REFGEN_CRASH_AT=point)
        try:
            if point in RETRY_POINTS:  # one image's first create fails: it is retried
                cluster.fake.inject("create", Fault(503, only_if_body_contains=ROOFTOP))
            start_workers(cluster, ["a", "b"])
            listener = send(cluster, plan, report)
            collect(cluster, listener, report, timeout_s=120)
            report.note(f"workers that died: {exited(cluster)}")
        finally:
            cluster.close()

    return body


def crash_in_watchdog(point: str, tmp: Path, plan: dict[str, Any]) -> Callable[[Report], None]:
    """A victim works the job alone and is killed; the two standby workers' watchdogs race to
    claim its leases, and the first to do so dies at ``point`` (or fails its re-send)."""
    switch = "REFGEN_FAIL_AT" if point == "watchdog.resend" else "REFGEN_CRASH_AT"

    def body(report: Report) -> None:
        cluster = Cluster(tmp)
        # Long enough that the victim still holds its four images when the standbys are up.
        cluster.fake.default_plan = PredictionPlan(duration=12.0, predict_time=12.0)
        try:
            cluster.start_worker("victim")
            listener = send(cluster, plan, report)
            wait_for(lambda: len(cluster.fake.creates) == 4, 30, "the victim's predictions")
            start_workers(cluster, ["a", "b"], **{switch: point})
            held = leases_held(cluster)
            cluster.signal("victim", signal.SIGKILL)
            report.note(f"victim killed holding {held} leases")
            collect(cluster, listener, report, timeout_s=120)
            logs = "".join(cluster.workers[n].log_path.read_text() for n in ("a", "b"))
            report.note(f"resend failures logged: {logs.count('lost_task_resend_failed')}")
            report.note(f"workers that died: {exited(cluster)}")
        finally:
            cluster.close()

    return body


def kill_during_retry_countdown(tmp: Path, plan: dict[str, Any]) -> Callable[[Report], None]:
    def body(report: Report) -> None:
        cluster = Cluster(tmp)
        cluster.fake.inject("create", Fault(503, only_if_body_contains=ROOFTOP))
        try:
            cluster.start_worker("victim")
            listener = send(cluster, plan, report)
            wait_for(
                lambda: any(
                    m["event_type"] == c.EVENT_IMAGE_RETRY for m in list(listener.messages)
                ),
                30,
                "the retry",
            )
            cluster.signal("victim", signal.SIGKILL)  # inside the 2 s countdown
            report.note("victim killed while its retry waited out its countdown")
            cluster.start_worker("rescuer")
            collect(cluster, listener, report, timeout_s=120)
        finally:
            cluster.close()

    return body


def two_workers_killed_in_turn(tmp: Path, plan: dict[str, Any]) -> Callable[[Report], None]:
    def body(report: Report) -> None:
        cluster = Cluster(tmp)
        cluster.fake.default_plan = PredictionPlan(duration=5.0, predict_time=5.0)
        try:
            start_workers(cluster, ["first", "second"])
            listener = send(cluster, plan, report)
            wait_for(lambda: len(cluster.fake.creates) == 4, 30, "the predictions")
            cluster.signal("first", signal.SIGKILL)
            report.note("first worker killed")
            log = cluster.workers["second"].log_path
            wait_for(lambda: "lost_task_resent" in log.read_text(), 30, "the second to rescue")
            time.sleep(0.5)
            cluster.signal("second", signal.SIGKILL)
            report.note("second worker killed while rescuing")
            cluster.start_worker("third")
            collect(cluster, listener, report, timeout_s=120)
        finally:
            cluster.close()

    return body


def frozen_and_thawed(tmp: Path, plan: dict[str, Any]) -> Callable[[Report], None]:
    def body(report: Report) -> None:
        cluster = Cluster(tmp)
        cluster.fake.default_plan = PredictionPlan(duration=6.0, predict_time=6.0)
        try:
            cluster.start_worker("frozen")
            listener = send(cluster, plan, report)
            wait_for(lambda: len(cluster.fake.creates) == 4, 30, "the predictions")
            cluster.start_worker("standby")
            cluster.signal("frozen", signal.SIGSTOP)
            report.note("worker frozen (SIGSTOP)")
            time.sleep(3 * LEASE_TTL_S + 1)
            cluster.signal("frozen", signal.SIGCONT)
            report.note("worker thawed (SIGCONT)")
            collect(cluster, listener, report, timeout_s=120)
            report.note(f"workers that died: {exited(cluster)}")
        finally:
            cluster.close()

    return body


def redis_stopped(tmp: Path, plan: dict[str, Any]) -> Callable[[Report], None]:
    def body(report: Report) -> None:
        cluster = Cluster(tmp)
        cluster.fake.default_plan = PredictionPlan(duration=4.0, predict_time=4.0)
        try:
            start_workers(cluster, ["a", "b"])
            listener = send(cluster, plan, report)
            wait_for(lambda: len(cluster.fake.creates) == 4, 30, "the predictions")
            cluster.broker.stop()
            report.note("redis-server stopped")
            time.sleep(3 * LEASE_TTL_S)
            cluster.broker.start()
            report.note("redis-server started again (AOF)")
            collect(cluster, listener, report, timeout_s=150)
        finally:
            cluster.close()

    return body


Scenario = Callable[[Report], None]


def lost_create_answer(disconnect: bool) -> Callable[[Path, dict[str, Any]], Scenario]:
    """Replicate makes and bills the rooftop's prediction; its answer is lost (an edge's 502
    during the sync hold, or a closed connection). The retry adopts it (issue 20)."""

    def make(tmp: Path, plan: dict[str, Any]) -> Scenario:
        def body(report: Report) -> None:
            cluster = Cluster(tmp)
            cluster.fake.lose_next_create_answers(
                delay=0.5, disconnect=disconnect, prompt_contains=ROOFTOP
            )
            try:
                start_workers(cluster, ["a", "b"])
                listener = send(cluster, plan, report)
                collect(cluster, listener, report, timeout_s=120)
            finally:
                cluster.close()

        return body

    return make


def redis_gone_at(point: str) -> Callable[[Path, dict[str, Any]], Scenario]:
    """Redis stops for 3 s exactly at a publish (the switch holds the publisher there while
    the scenario stops Redis) and comes back with its AOF (issue 20)."""

    def make(tmp: Path, plan: dict[str, Any]) -> Scenario:
        def body(report: Report) -> None:
            hold = tmp / "hold"
            cluster = Cluster(tmp, REFGEN_HOLD_AT=point, REFGEN_HOLD_FILE=str(hold))
            if point == "publish.image_retry":  # the rooftop's first create fails: a retry
                cluster.fake.inject("create", Fault(503, only_if_body_contains=ROOFTOP))
            try:
                start_workers(cluster, ["a", "b"])
                listener = send(cluster, plan, report)
                wait_for(hold.exists, 60, f"a publisher to reach {point}")
                cluster.broker.stop()
                hold.unlink()
                report.note(f"redis-server stopped at {point}")
                time.sleep(3.0)
                cluster.broker.start()
                report.note("redis-server started again (AOF)")
                collect(cluster, listener, report, timeout_s=120)
            finally:
                cluster.close()

        return body

    return make


SPECIAL = {
    "kill_during_retry_countdown": kill_during_retry_countdown,
    "two_workers_killed_in_turn": two_workers_killed_in_turn,
    "frozen_for_three_lease_lifetimes": frozen_and_thawed,
    "redis_stopped_longer_than_a_lease": redis_stopped,
    "lost_create_answer_edge_502": lost_create_answer(disconnect=False),
    "lost_create_answer_connection_closed": lost_create_answer(disconnect=True),
    "redis_gone_3_s_at_the_chords_publish": redis_gone_at("publish.start_chord"),
    "redis_gone_3_s_at_a_retrys_publish": redis_gone_at("publish.image_retry"),
    "redis_gone_3_s_at_the_callbacks_publish": redis_gone_at("publish.callback"),
}


PLAN = Path(__file__).parents[2] / "examples" / "plans" / "typical_2x2.json"


def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Scenario]:
    """Every scenario of the campaign, by the name its test asks for."""

    def fresh_plan() -> dict[str, Any]:
        plan: dict[str, Any] = json.loads(PLAN.read_text())
        plan["job_id"] = str(uuid.uuid4())
        return plan

    built: dict[str, Scenario] = {}
    for point in POINTS + RETRY_POINTS:
        built[point] = crash_at(point, tmp_path_factory.mktemp(point), fresh_plan())
    for point in [*WATCHDOG_POINTS, "watchdog.resend"]:
        built[point] = crash_in_watchdog(point, tmp_path_factory.mktemp(point), fresh_plan())
    for name, make in SPECIAL.items():
        built[name] = make(tmp_path_factory.mktemp(name), fresh_plan())
    return built
