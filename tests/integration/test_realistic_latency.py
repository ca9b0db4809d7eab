"""The live view with images that take as long as real SDXL images (the realistic-latency
profile: 9 s each). Every job then has quiet spells longer than any socket timeout a client
library picks by default; one SSE connection, and the page, must ride through them all.

The quiet spell each test proves is made certain rather than hoped for: once the connection
is live, the worker is frozen (SIGSTOP) for longer than those timeouts, so no event can be
published however slowly this machine runs; the job's events, stamped by Redis's clock, then
show the spell, and the job ends after it on the same connection."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tasks.harness import JobRun, JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer, free_port
from tests.integration.gatewaykit import (
    CHROMIUM_ARGS,
    Sse,
    chromium,
    log_lines,
    running_gateway,
    wait_known,
)
from worker import constants as c

pytestmark = [pytest.mark.integration, pytest.mark.realistic, pytest.mark.timeout(240)]
LATENCY_S = 9.0
KEEPALIVE_S = 2.0
# The worker stays frozen at least this long: past redis-py's and httpx's default 5 s socket
# timeouts, so a connection that needed events to stay open would have dropped.
QUIET_S = 6.0


@dataclass
class SlowStack:
    url: str
    runner: JobRunner
    log: Path
    worker: WorkerProcess
    redis: redis.Redis


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Iterator[SlowStack]:
    tmp = tmp_path_factory.mktemp("realistic")
    port = free_port()
    with RedisServer() as broker:
        env = base_worker_env(broker.url, tmp / "storage")
        env.update(
            GENERATOR_BACKEND="local",
            STORAGE_BACKEND="local",
            LOCAL_GENERATOR_LATENCY_S=str(LATENCY_S),
            LOCAL_STORAGE_PUBLIC_URL=f"http://127.0.0.1:{port}",
            GATEWAY_KEEPALIVE_S=str(KEEPALIVE_S),
        )
        runner = JobRunner(broker.url)
        worker = WorkerProcess(env, tmp / "worker.log", "slow").start(runner.client)
        client = redis.Redis.from_url(broker.url, decode_responses=True)
        try:
            with running_gateway(env, tmp / "gateway.log", port) as url:
                yield SlowStack(url, runner, tmp / "gateway.log", worker, client)
        finally:
            worker.stop()
            client.close()


def start(stack: SlowStack, plan: dict) -> tuple[threading.Thread, list[JobRun]]:
    """Send the job as upstream does, recording its pub/sub events, and wait until the
    gateway knows it: the moment a browser would open its page."""
    box: list[JobRun] = []
    thread = threading.Thread(target=lambda: box.append(stack.runner(plan, timeout_s=90)))
    thread.start()
    wait_known(stack.url, plan["job_id"])
    return thread, box


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.05)


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def group_frozen(pgid: int) -> bool:
    """Every process of the group is stopped (state T): none can publish anything."""
    states = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                states.append(fields[0])
    return bool(states) and all(state in ("T", "t") for state in states)


@dataclass
class Spell:
    """When the worker was frozen, on Redis's clock (the one that stamps the job's events)."""

    from_ms: int = 0
    to_ms: int = 0


@contextlib.contextmanager
def worker_frozen(stack: SlowStack) -> Iterator[Spell]:
    """The worker SIGSTOPped for the body (which waits at least ``QUIET_S``), then resumed."""
    assert stack.worker.process is not None
    pgid = stack.worker.process.pid
    spell = Spell()
    os.killpg(pgid, signal.SIGSTOP)
    try:
        wait_until(lambda: group_frozen(pgid), "the worker stopping", timeout_s=10)
        spell.from_ms = redis_ms(stack.redis)
        time.sleep(QUIET_S)
        yield spell
        spell.to_ms = redis_ms(stack.redis)
    finally:
        os.killpg(pgid, signal.SIGCONT)


def assert_the_job_spanned(stack: SlowStack, job_id: str, spell: Spell) -> None:
    """The job's events on Redis's clock: some before the spell, none during it, the rest
    (its final event among them) after it."""
    stamps = [int(i.split("-")[0]) for i, _ in stack.redis.xrange(c.events_stream(job_id))]
    before = [t for t in stamps if t <= spell.from_ms]
    after = [t for t in stamps if t >= spell.to_ms]
    assert spell.to_ms > spell.from_ms and before and after, (spell, stamps)
    assert len(before) + len(after) == len(stamps), (spell, stamps)


def event_streams(stack: SlowStack, job_id: str) -> list[dict]:
    """The gateway's log lines for the job's event streams, once the stream it ended is logged
    (the line is written as its response completes, a moment after the client saw it end)."""

    def logged() -> list[dict]:
        return [
            line
            for line in log_lines(stack.log)
            if line["event"] == "http_request" and line["path"].endswith(f"{job_id}/events")
        ]

    wait_until(logged, "the event stream's log line", timeout_s=20)
    return logged()


def test_one_connection_carries_a_realistic_job_to_its_final_event(slow, load_plan) -> None:
    plan = load_plan("minimal_1x1")  # two images of 9 s, side by side
    thread, box = start(slow, plan)
    sse, failures = Sse(), []

    def read() -> None:
        url = f"{slow.url}/jobs/{plan['job_id']}/events"
        try:
            with httpx.stream("GET", url, timeout=60) as response:
                assert response.status_code == 200
                sse.read(response)
        except BaseException as exc:  # shown by the test, not lost in the thread
            failures.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(
        lambda: failures or c.EVENT_IMAGE_START in [m["event_type"] for m in sse.messages],
        "an image's start on the connection",
    )
    with worker_frozen(slow) as spell:
        # Quiet, but not silent: the connection is kept alive through the spell.
        comments = sse.comments
        wait_until(lambda: sse.comments >= comments + 2 or failures, "two keep-alives")
    reader.join(timeout=90)
    thread.join()

    assert failures == []
    assert sse.ended  # the server closed it, after the final event
    assert [(m["event_type"], m["data"]) for m in sse.messages] == box[0].events
    assert sse.messages[-1]["data"]["result_status"] == "success"
    # Live before the quiet spell (longer than redis-py's default 5 s socket timeout), and the
    # rest of the job, final event included, after it: on this one connection.
    assert_the_job_spanned(slow, plan["job_id"], spell)

    lines = log_lines(slow.log)
    assert "Traceback" not in slow.log.read_text()
    assert [line for line in lines if line["level"] in ("warning", "error", "critical")] == []
    streams = event_streams(slow, plan["job_id"])
    assert len(streams) == 1 and streams[0]["status"] == 200  # one connection, not retries


# Every text the status badge shows, recorded by the page itself from its first script on.
RECORD_STATUS = """
window.__statuses = [];
new MutationObserver(() => {
  const el = document.querySelector("[data-testid=status]");
  if (el) window.__statuses.push(el.textContent);
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def test_the_page_never_shows_reconnecting_through_a_realistic_job(slow, load_plan) -> None:
    from playwright.sync_api import sync_playwright

    plan = load_plan("minimal_1x1")
    with sync_playwright() as p:
        # The browser is up before the job is sent: on a loaded machine its start took longer
        # than the job's 9 s images, and the page first showed the job already ended.
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.add_init_script(RECORD_STATUS)
            thread, _ = start(slow, plan)
            page.goto(f"{slow.url}/jobs/{plan['job_id']}")
            status = page.locator("[data-testid=status]")
            seen: list[str] = []

            def watch(until: Callable[[], bool], what: str) -> None:
                deadline = time.monotonic() + 60
                while not until():
                    assert time.monotonic() < deadline, (what, seen)
                    seen.append(status.inner_text())
                    page.wait_for_timeout(250)

            watch(lambda: "running" in status.inner_text().lower(), "the running job")
            with worker_frozen(slow) as spell:
                seen.append(status.inner_text())  # the page, in the quiet spell
            watch(lambda: bool(page.locator("body[data-finished=true]").count()), "the end")
            statuses = page.evaluate("window.__statuses")
            assert status.inner_text().lower() == "success"
            assert page.locator("[data-testid=image]").count() == 2
        finally:
            browser.close()
    thread.join()
    everything = [s.lower() for s in statuses + seen]
    assert "running" in everything  # it was watched while the images were made
    assert_the_job_spanned(slow, plan["job_id"], spell)  # and through the quiet spell
    assert not [s for s in everything if "reconnecting" in s or "disconnected" in s]
    assert len(event_streams(slow, plan["job_id"])) == 1  # the page's one EventSource
