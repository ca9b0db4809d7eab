"""The live view with images that take as long as real SDXL images (the realistic-latency
profile: 9 s each). Every job then has quiet spells longer than any socket timeout a client
library picks by default; one SSE connection, and the page, must ride through them all."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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

pytestmark = [pytest.mark.integration, pytest.mark.realistic, pytest.mark.timeout(240)]
LATENCY_S = 9.0
KEEPALIVE_S = 2.0


@dataclass
class SlowStack:
    url: str
    runner: JobRunner
    log: Path


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
        try:
            with running_gateway(env, tmp / "gateway.log", port) as url:
                yield SlowStack(url, runner, tmp / "gateway.log")
        finally:
            worker.stop()


def start(stack: SlowStack, plan: dict) -> tuple[threading.Thread, list[JobRun]]:
    """Send the job as upstream does, recording its pub/sub events, and wait until the
    gateway knows it: the moment a browser would open its page."""
    box: list[JobRun] = []
    thread = threading.Thread(target=lambda: box.append(stack.runner(plan, timeout_s=90)))
    thread.start()
    wait_known(stack.url, plan["job_id"])
    return thread, box


def test_one_connection_carries_a_realistic_job_to_its_final_event(slow, load_plan) -> None:
    plan = load_plan("minimal_1x1")  # two images of 9 s, side by side
    thread, box = start(slow, plan)
    sse = Sse()
    with httpx.stream("GET", f"{slow.url}/jobs/{plan['job_id']}/events", timeout=60) as response:
        assert response.status_code == 200
        sse.read(response)
    thread.join()

    assert sse.ended  # the server closed it, after the final event
    assert [(m["event_type"], m["data"]) for m in sse.messages] == box[0].events
    assert sse.messages[-1]["data"]["result_status"] == "success"
    # Events arrived live, across the images' quiet spell (opened as the job started, so the
    # spell is a little shorter than an image), which outlasted redis-py's default 5 s
    # socket timeout...
    assert sse.longest_quiet_s >= LATENCY_S - 1.5
    # ...and keep-alives filled it.
    assert sse.comments >= int((LATENCY_S - 1.5) / KEEPALIVE_S)

    lines = log_lines(slow.log)
    assert "Traceback" not in slow.log.read_text()
    assert [line for line in lines if line["level"] in ("warning", "error", "critical")] == []
    streams = [
        line
        for line in lines
        if line["event"] == "http_request" and line["path"].endswith(f"{plan['job_id']}/events")
    ]
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
    thread, _ = start(slow, plan)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.add_init_script(RECORD_STATUS)
            page.goto(f"{slow.url}/jobs/{plan['job_id']}")
            seen: list[str] = []
            watched_from = time.monotonic()
            deadline = watched_from + 60
            while not page.locator("body[data-finished=true]").count():
                assert time.monotonic() < deadline, seen
                seen.append(page.locator("[data-testid=status]").inner_text())
                page.wait_for_timeout(250)
            watched_s = time.monotonic() - watched_from
            statuses = page.evaluate("window.__statuses")
            assert page.locator("[data-testid=status]").inner_text().lower() == "success"
            assert page.locator("[data-testid=image]").count() == 2
        finally:
            browser.close()
    thread.join()
    everything = [s.lower() for s in statuses + seen]
    assert "running" in everything  # it was watched while the images were made
    assert watched_s >= LATENCY_S - 1.5  # and through the images' quiet spell
    assert not [s for s in everything if "reconnecting" in s or "disconnected" in s]
