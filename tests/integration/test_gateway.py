"""The SSE gateway and the live job page, against a real gateway process, a real worker and
a real browser (Debian's Chromium driven by Playwright)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tasks.harness import JobRun, JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
DOOMED = "rooftop"  # the worker's generator always fails this image, retryably


@dataclass
class Sse:
    """One Server-Sent Events connection, read the way a browser reads it."""

    events: list[tuple[str, dict]] = field(default_factory=list)  # (id, message)
    comments: int = 0
    ended: bool = False

    def read(self, response: httpx.Response, stop_after: int | None = None) -> None:
        event_id, data = "", []
        for line in response.iter_lines():
            if line.startswith(":"):
                self.comments += 1
            elif line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                self.events.append((event_id, json.loads("\n".join(data))))
                data = []
                if stop_after is not None and len(self.events) >= stop_after:
                    return
        self.ended = True

    @property
    def messages(self) -> list[dict]:
        return [m for _, m in self.events]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[str, JobRunner]]:
    tmp = tmp_path_factory.mktemp("gateway")
    port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"
    with RedisServer() as broker:
        env = base_worker_env(broker.url, tmp / "storage")
        env.update(
            GENERATOR_BACKEND="local",
            STORAGE_BACKEND="local",
            LOCAL_GENERATOR_LATENCY_S="1.5",
            LOCAL_GENERATOR_FAIL_IDS=DOOMED,
            LOCAL_STORAGE_PUBLIC_URL=gateway_url,
            GATEWAY_KEEPALIVE_S="1",
        )
        runner = JobRunner(broker.url)
        worker = WorkerProcess(env, tmp / "worker.log", "gw").start(runner.client)
        with (tmp / "gateway.log").open("ab") as log:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "tasks.cli", "gateway", "--port", str(port)],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{gateway_url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp / "gateway.log").read_text()
                time.sleep(0.2)
            yield gateway_url, runner
        finally:
            gateway.terminate()
            gateway.wait(timeout=10)
            worker.stop()


def send(runner: JobRunner, plan: dict) -> None:
    runner.client.send_task(
        "reference_generator.start", kwargs={"job_id": plan["job_id"], "plan": plan}
    )


def wait_known(url: str, job_id: str) -> None:
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/jobs/{job_id}").status_code == 404:
        assert time.monotonic() < deadline, "the gateway never learned of the job"
        time.sleep(0.05)


def in_background(runner: JobRunner, plan: dict) -> tuple[threading.Thread, list[JobRun]]:
    box: list[JobRun] = []
    thread = threading.Thread(target=lambda: box.append(runner(plan, timeout_s=60)))
    thread.start()
    time.sleep(0.3)  # the runner subscribes before it sends
    return thread, box


def test_unknown_job_is_404(stack) -> None:
    url, _ = stack
    assert httpx.get(f"{url}/jobs/no-such-job/events").status_code == 404
    assert httpx.get(f"{url}/jobs/no-such-job").status_code == 404


def test_live_subscriber_gets_every_event_and_the_stream_ends(stack, load_plan) -> None:
    url, runner = stack
    # Its rooftop fails and is retried 2 s later: about 5 s of job, several keep-alive periods.
    plan = load_plan("typical_2x2")
    thread, box = in_background(runner, plan)  # pub/sub, as the existing gateway sees it
    wait_known(url, plan["job_id"])
    sse = Sse()
    with httpx.stream("GET", f"{url}/jobs/{plan['job_id']}/events", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        sse.read(response)
    thread.join()
    assert sse.ended  # closed by the server after the final stage_update
    assert sse.messages[-1]["event_type"] == "stage_update"
    assert sse.messages[-1]["data"]["status"] == "completed"
    assert sse.messages[-1]["data"]["result_status"] == "partial"
    pubsub = [(t, d) for t, d in box[0].events]
    assert [(m["event_type"], m["data"]) for m in sse.messages] == pubsub
    assert sse.comments >= 1  # keep-alive comments while the images were generating
    ids = [i for i, _ in sse.events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


def test_late_subscriber_gets_the_history_in_live_order(stack, load_plan) -> None:
    url, runner = stack
    plan = load_plan("typical_2x2")
    run = runner(plan)  # finished before anyone subscribes
    sse = Sse()
    with httpx.stream("GET", f"{url}/jobs/{plan['job_id']}/events", timeout=30) as response:
        sse.read(response)
    assert sse.ended
    assert [(m["event_type"], m["data"]) for m in sse.messages] == run.events
    stamps = [m["published_at"] for m in sse.messages]
    assert stamps == sorted(stamps)


def test_reconnect_with_last_event_id_loses_nothing_and_repeats_nothing(stack, load_plan) -> None:
    url, runner = stack
    plan = load_plan("typical_2x2")
    thread, box = in_background(runner, plan)
    wait_known(url, plan["job_id"])
    first = Sse()
    with httpx.stream("GET", f"{url}/jobs/{plan['job_id']}/events", timeout=30) as response:
        first.read(response, stop_after=3)  # the connection drops mid-job
    last_id = first.events[-1][0]
    time.sleep(1.0)  # events keep coming while the client is away
    second = Sse()
    with httpx.stream(
        "GET", f"{url}/jobs/{plan['job_id']}/events", timeout=30, headers={"Last-Event-ID": last_id}
    ) as response:
        second.read(response)
    thread.join()
    together = first.events + second.events
    assert len({i for i, _ in together}) == len(together)  # no duplicate
    assert [(m["event_type"], m["data"]) for _, m in together] == box[0].events  # no loss


def test_two_jobs_streams_never_mix(stack, load_plan) -> None:
    url, runner = stack
    plans = [load_plan("minimal_1x1"), load_plan("typical_2x2")]
    runs = [in_background(runner, plan) for plan in plans]
    for plan in plans:
        wait_known(url, plan["job_id"])
    streams = {}
    for plan in plans:
        sse = Sse()
        with httpx.stream("GET", f"{url}/jobs/{plan['job_id']}/events", timeout=30) as response:
            sse.read(response)
        streams[plan["job_id"]] = sse
    for plan, (thread, box) in zip(plans, runs, strict=True):
        thread.join()
        sse = streams[plan["job_id"]]
        assert [(m["event_type"], m["data"]) for m in sse.messages] == box[0].events
    first_ids = {m["data"].get("image_id") for m in streams[plans[0]["job_id"]].messages}
    assert first_ids - {None} == {"forest", "singer"}


def test_metrics_show_the_jobs_figures(stack, load_plan) -> None:
    url, runner = stack
    before = httpx.get(f"{url}/metrics").text
    runner(load_plan("minimal_1x1"))
    after = httpx.get(f"{url}/metrics").text

    def value(text: str, name: str) -> float:
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        return float(line.split()[-1])

    assert (
        value(after, 'refgen_jobs_total{outcome="success"}')
        == value(before, 'refgen_jobs_total{outcome="success"}') + 1
    )
    assert (
        value(after, 'refgen_images_total{result="made"}')
        == value(before, 'refgen_images_total{result="made"}') + 2
    )
    assert value(after, "refgen_cost_dollars_total") == pytest.approx(
        value(before, "refgen_cost_dollars_total") + 0.01
    )
    assert (
        value(after, "refgen_job_duration_seconds_count")
        == value(before, "refgen_job_duration_seconds_count") + 1
    )
    assert "refgen_replicate_rate_limited_total" in after


def test_browser_shows_the_finished_job(stack, load_plan) -> None:
    from playwright.sync_api import sync_playwright

    url, runner = stack
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is required (CI installs it)"
    plan = load_plan("typical_2x2")  # its rooftop scene always fails
    send(runner, plan)
    wait_known(url, plan["job_id"])
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "job-page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{url}/jobs/{plan['job_id']}")
            page.wait_for_selector("body[data-finished=true]", timeout=60_000)
            page.wait_for_function(
                "[...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth)"
            )
            page.screenshot(path=str(shot), full_page=True)
            images = page.locator("[data-testid=image]")
            assert images.count() == 3
            widths = images.evaluate_all("els => els.map(e => e.naturalWidth)")
            assert widths == [1024, 1024, 1024]
            reasons = page.locator("[data-testid=failure-reason]")
            assert reasons.count() == 1
            assert "temporarily unavailable" in reasons.inner_text()
            assert page.locator("[data-testid=retry-badge]").count() == 1
            assert page.locator("[data-testid=status]").inner_text().lower() == "partial"
            assert page.locator("[data-testid=total-cost]").inner_text() == "$0.015"
            assert page.locator("[data-testid=cost-breakdown] tbody tr").count() == 4
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}")
