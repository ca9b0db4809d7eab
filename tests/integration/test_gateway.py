"""The SSE gateway, the job pages and the index, against a real gateway process, a real worker
and a real browser (Debian's Chromium driven by Playwright)."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis

from tasks.harness import JobRun, JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer, free_port
from tests.integration.gatewaykit import (
    CHROMIUM_ARGS,
    SECRETS,
    Sse,
    chromium,
    job_token,
    log_lines,
    operator_token,
    publish_one_image_job,
    running_gateway,
    wait_known,
)
from worker import constants as c
from worker.events import (
    EventPublisher,
    StageFinished,
    StageStarted,
)
from worker.job_index import JobIndex

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
DOOMED = "rooftop"  # the worker's generator always fails this image, retryably
# The stack's gateway asks for tokens (GATEWAY_JWT_SECRET): these tests read as an operator;
# the browser tests open a job's page with that job's token, as a viewer does.
OPERATOR = {"Authorization": f"Bearer {operator_token(ttl_s=3600)}"}
http = httpx.Client(headers=OPERATOR)


@dataclass
class Stack:
    url: str
    runner: JobRunner
    log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
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
            GATEWAY_JWT_SECRET=SECRETS,
        )
        runner = JobRunner(broker.url)
        worker = WorkerProcess(env, tmp / "worker.log", "gw").start(runner.client)
        try:
            with running_gateway(env, tmp / "gateway.log", port) as url:
                yield Stack(url, runner, tmp / "gateway.log")
        finally:
            worker.stop()


def send(runner: JobRunner, plan: dict) -> None:
    runner.client.send_task(
        "reference_generator.start", kwargs={"job_id": plan["job_id"], "plan": plan}
    )


def in_background(runner: JobRunner, plan: dict) -> tuple[threading.Thread, list[JobRun]]:
    box: list[JobRun] = []
    thread = threading.Thread(target=lambda: box.append(runner(plan, timeout_s=60)))
    thread.start()
    time.sleep(0.3)  # the runner subscribes before it sends
    return thread, box


def test_unknown_job_is_404(stack) -> None:
    assert http.get(f"{stack.url}/jobs/no-such-job/events").status_code == 404
    assert http.get(f"{stack.url}/jobs/no-such-job").status_code == 404


def test_bad_input_gets_a_clear_400_before_any_stream(stack, load_plan) -> None:
    plan = load_plan("minimal_1x1")
    run = stack.runner(plan)
    events = f"{stack.url}/jobs/{plan['job_id']}/events"
    for bad in ("garbage", "0", "1-2-3", "-1-0", "1700000000000-0; DROP"):
        for reply in (
            http.get(events, headers={"Last-Event-ID": bad}),
            http.get(events, params={"after": bad}),
        ):
            assert reply.status_code == 400, (bad, reply.text)
            assert reply.headers["content-type"] == "application/json"
            assert "Last-Event-ID must be the id of an event" in reply.json()["detail"]
    for bad_id in ("not%20a%20job", "a" * 65, "%3Cscript%3E", "job.id", "%C3%A9t%C3%A9"):
        for path in (f"/jobs/{bad_id}/events", f"/jobs/{bad_id}"):
            reply = http.get(f"{stack.url}{path}")
            assert reply.status_code == 400, (path, reply.status_code)
            assert "cannot be a job id" in reply.text
    page = http.get(f"{stack.url}/jobs/%3Cscript%3E")
    assert "&lt;script&gt;" in page.text and "<script>" not in page.text

    # A good Last-Event-ID still resumes after it.
    whole = Sse()
    with http.stream("GET", events, timeout=30) as response:
        whole.read(response)
    third = whole.events[2][0]
    rest = Sse()
    with http.stream("GET", events, headers={"Last-Event-ID": third}, timeout=30) as response:
        assert response.status_code == 200
        rest.read(response)
    assert rest.events == whole.events[3:]
    assert [(m["event_type"], m["data"]) for m in whole.messages] == run.events
    assert "Traceback" not in stack.log.read_text()


def test_a_finished_job_whose_events_expired_says_so(stack, load_plan) -> None:
    plan = load_plan("minimal_1x1")
    stack.runner(plan)
    client = redis.Redis.from_url(stack.runner.redis_url, decode_responses=True)
    client.delete(c.events_stream(plan["job_id"]))  # what a day after the job does
    client.close()
    events = http.get(f"{stack.url}/jobs/{plan['job_id']}/events")
    assert events.status_code == 404
    assert "have expired" in events.json()["detail"]
    page = http.get(f"{stack.url}/jobs/{plan['job_id']}")
    assert page.status_code == 200 and 'data-events-expired="true"' in page.text


def test_live_subscriber_gets_every_event_and_the_stream_ends(stack, load_plan) -> None:
    url, runner = stack.url, stack.runner
    # Its rooftop fails and is retried 2 s later: about 5 s of job, several keep-alive periods.
    plan = load_plan("typical_2x2")
    thread, box = in_background(runner, plan)  # pub/sub, as the existing gateway sees it
    wait_known(url, plan["job_id"], OPERATOR)
    sse = Sse()
    with http.stream("GET", f"{url}/jobs/{plan['job_id']}/events", timeout=30) as response:
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
    plan = load_plan("typical_2x2")
    run = stack.runner(plan)  # finished before anyone subscribes
    sse = Sse()
    with http.stream("GET", f"{stack.url}/jobs/{plan['job_id']}/events", timeout=30) as response:
        sse.read(response)
    assert sse.ended
    assert [(m["event_type"], m["data"]) for m in sse.messages] == run.events
    stamps = [m["published_at"] for m in sse.messages]
    assert stamps == sorted(stamps)


def test_reconnect_with_last_event_id_loses_nothing_and_repeats_nothing(stack, load_plan) -> None:
    url, runner = stack.url, stack.runner
    plan = load_plan("typical_2x2")
    thread, box = in_background(runner, plan)
    wait_known(url, plan["job_id"], OPERATOR)
    first = Sse()
    with http.stream("GET", f"{url}/jobs/{plan['job_id']}/events", timeout=30) as response:
        first.read(response, stop_after=3)  # the connection drops mid-job
    last_id = first.events[-1][0]
    time.sleep(1.0)  # events keep coming while the client is away
    second = Sse()
    with http.stream(
        "GET", f"{url}/jobs/{plan['job_id']}/events", timeout=30, headers={"Last-Event-ID": last_id}
    ) as response:
        second.read(response)
    thread.join()
    together = first.events + second.events
    assert len({i for i, _ in together}) == len(together)  # no duplicate
    assert [(m["event_type"], m["data"]) for _, m in together] == box[0].events  # no loss


def test_two_jobs_streams_never_mix(stack, load_plan) -> None:
    url, runner = stack.url, stack.runner
    plans = [load_plan("minimal_1x1"), load_plan("typical_2x2")]
    runs = [in_background(runner, plan) for plan in plans]
    for plan in plans:
        wait_known(url, plan["job_id"], OPERATOR)
    streams = {}
    for plan in plans:
        sse = Sse()
        with http.stream("GET", f"{url}/jobs/{plan['job_id']}/events", timeout=30) as response:
            sse.read(response)
        streams[plan["job_id"]] = sse
    for plan, (thread, box) in zip(plans, runs, strict=True):
        thread.join()
        sse = streams[plan["job_id"]]
        assert [(m["event_type"], m["data"]) for m in sse.messages] == box[0].events
    first_ids = {m["data"].get("image_id") for m in streams[plans[0]["job_id"]].messages}
    assert first_ids - {None} == {"forest", "singer"}


def index_rows(html: str) -> dict[str, dict[str, str]]:
    rows = {}
    for row in re.findall(r'<tr data-testid="job".*?</tr>', html):
        job_id = re.search(r'data-job-id="([^"]+)"', row)[1]
        rows[job_id] = {
            "status": re.search(r'data-status="([^"]+)"', row)[1],
            "images": re.search(r'data-testid="images">([^<]*)<', row)[1],
            "cost": re.search(r'data-testid="cost">([^<]*)<', row)[1],
            "link": re.search(r'<a href="([^"]+)"', row)[1],
        }
    return rows


def test_the_index_lists_recent_jobs_with_links_to_their_pages(stack, load_plan) -> None:
    partial = load_plan("typical_2x2")  # its rooftop always fails
    stack.runner(partial)
    refused = load_plan("minimal_1x1")
    stack.runner(refused, duration_seconds=0.001)
    running = load_plan("minimal_1x1")
    send(stack.runner, running)
    deadline = time.monotonic() + 10
    while True:  # until its start is announced (its images take 1.5 s)
        reply = http.get(f"{stack.url}/")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
        rows = index_rows(reply.text)
        if running["job_id"] in rows:
            break
        assert time.monotonic() < deadline, "the running job never showed"
        time.sleep(0.05)
    assert rows[partial["job_id"]] == {
        "status": "partial",
        "images": "3/4",
        "cost": "$0.015",
        "link": rows[partial["job_id"]]["link"],
    }
    # Each link carries a token for its job alone.
    assert rows[partial["job_id"]]["link"].startswith(f"/jobs/{partial['job_id']}?token=")
    assert rows[refused["job_id"]]["status"] == "refused"
    assert rows[refused["job_id"]]["images"] == "–"  # nothing was made or planned
    assert rows[running["job_id"]]["status"] == "running"
    assert rows[running["job_id"]]["images"] == "2 planned"
    order = list(rows)
    assert (
        order.index(running["job_id"])
        < order.index(refused["job_id"])
        < order.index(partial["job_id"])
    )  # newest first
    page = http.get(f"{stack.url}{rows[partial['job_id']]['link']}")
    assert page.status_code == 200 and partial["job_id"] in page.text


def test_the_gateway_logs_its_address_and_one_line_per_request(stack, load_plan) -> None:
    lines = log_lines(stack.log)  # every line is JSON (LOG_FORMAT=json)
    listening = [line for line in lines if line["event"] == "gateway_listening"]
    assert len(listening) == 1 and listening[0]["url"] == stack.url

    missing = str(uuid.uuid4())
    for _ in range(3):
        assert http.get(f"{stack.url}/jobs/{missing}").status_code == 404
    run = stack.runner(load_plan("minimal_1x1"))
    image_url = run.result["scene_references"][0]["image_url"]
    signature = httpx.URL(image_url).params["signature"]
    assert http.get(image_url).status_code == 200

    def requests(path_part: str) -> list[dict]:
        lines = log_lines(stack.log)
        return [x for x in lines if x["event"] == "http_request" and path_part in x["path"]]

    deadline = time.monotonic() + 10  # a line is written once its response is sent
    while not requests("/files/"):
        assert time.monotonic() < deadline, stack.log.read_text()[-2000:]
        time.sleep(0.05)
    misses = requests(missing)
    assert len(misses) == 3
    assert {(x["method"], x["status"]) for x in misses} == {("GET", 404)}
    served = requests("/files/")
    assert served and served[-1]["status"] == 200 and served[-1]["bytes"] > 10_000
    text = stack.log.read_text()
    assert signature not in text and "signature=" not in text
    assert "Traceback" not in text


def test_metrics_show_the_jobs_figures(stack, load_plan) -> None:
    url, runner = stack.url, stack.runner
    before = http.get(f"{url}/metrics").text
    runner(load_plan("minimal_1x1"))
    after = http.get(f"{url}/metrics").text

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


def publish_file_link_job(redis_url: str) -> str:
    """A job as a worker without LOCAL_STORAGE_PUBLIC_URL announces it: file:// links."""
    job_id = str(uuid.uuid4())
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    link = f"file:///srv/refgen/{job_id}/scene_forest.png?expires=1&signature=x"
    publish_one_image_job(client, job_id, link)
    client.close()
    return job_id


def test_browser_shows_the_finished_job(stack, load_plan) -> None:
    from playwright.sync_api import sync_playwright

    url, runner = stack.url, stack.runner
    plan = load_plan("typical_2x2")  # its rooftop scene always fails
    send(runner, plan)
    wait_known(url, plan["job_id"], OPERATOR)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "job-page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{url}/jobs/{plan['job_id']}?token={job_token(plan['job_id'])}")
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
            assert not page.locator("[data-testid=storage-hint]").is_visible()

            # Workers without LOCAL_STORAGE_PUBLIC_URL: the page says how to fix it.
            local = publish_file_link_job(runner.redis_url)
            page.goto(f"{url}/jobs/{local}?token={job_token(local)}")
            page.wait_for_selector("body[data-finished=true]", timeout=10_000)
            hint = page.locator("[data-testid=storage-hint]")
            assert hint.is_visible()
            assert f"LOCAL_STORAGE_PUBLIC_URL={url}" in hint.inner_text()
            assert page.locator("[data-testid=image]").count() == 0

            # The index links to the job's page.
            page.goto(f"{url}/?token={operator_token()}")
            page.click(f"a[href^='/jobs/{plan['job_id']}?token=']")
            page.wait_for_selector("body[data-finished=true]", timeout=10_000)
            assert page.url.startswith(f"{url}/jobs/{plan['job_id']}?token=")
            # Without a token, the page does not open.
            assert page.goto(f"{url}/jobs/{plan['job_id']}").status == 401
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}")


def test_a_cancelled_job_ends_its_stream_and_its_page_and_index_say_so(stack, load_plan) -> None:
    from playwright.sync_api import sync_playwright

    url, runner = stack.url, stack.runner
    plan = load_plan("large_5x3")  # 8 images of 1.5 s on 4 slots: some still wait
    job_id = plan["job_id"]
    thread, box = in_background(runner, plan)
    wait_known(url, job_id, OPERATOR)
    runner.client.send_task(c.TASK_CANCEL, kwargs={"job_id": job_id, "reason": "the user left"})
    thread.join()
    final = box[0].events[-1][1]
    assert (final["status"], final["reason"]) == ("cancelled", "the user left")

    sse = Sse()
    with http.stream("GET", f"{url}/jobs/{job_id}/events", timeout=30) as response:
        sse.read(response)
    assert sse.ended  # the gateway knows a cancelled job's last word
    assert sse.messages[-1]["data"] == final

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}/jobs/{job_id}?token={job_token(job_id)}")
            page.wait_for_selector("body[data-finished=true]", timeout=30_000)
            assert page.locator("[data-testid=status]").inner_text().lower() == "cancelled"
            message = page.locator("[data-testid=message]").inner_text()
            assert message == (
                f"Cancelled: the user left. {final['successful_images']} of 8 images were made "
                "before it; the result is null."
            )
        finally:
            browser.close()
    rows = index_rows(http.get(f"{url}/").text)
    assert rows[job_id]["status"] == "cancelled"


# --- Redis goes away and comes back ----------------------------------------------------------


@dataclass
class Lonely:
    """A gateway over a Redis of its own, with no worker: the test publishes the events."""

    url: str
    broker: RedisServer
    log: Path


@pytest.fixture
def lonely(tmp_path) -> Iterator[Lonely]:
    # Append-only, so the job's stream is still there when this Redis comes back.
    with RedisServer(appendonly=True) as broker:
        env = base_worker_env(broker.url, tmp_path / "storage")
        env.update(GATEWAY_KEEPALIVE_S="0.5")
        with running_gateway(env, tmp_path / "gateway.log", free_port()) as url:
            yield Lonely(url, broker, tmp_path / "gateway.log")


def test_redis_down_is_a_503_and_a_stream_carries_on_when_it_returns(lonely) -> None:
    """Pages and metrics answer 503 at once; an open stream waits with keep-alives, and one
    opened while Redis is away waits for it too (a browser given a 503 would stop)."""
    url = lonely.url
    job_id = str(uuid.uuid4())
    client = redis.Redis.from_url(lonely.broker.url, decode_responses=True)
    events = EventPublisher(client, JobIndex(client))
    events.publish(job_id, StageStarted(total_images=1))

    sse = Sse()
    reader = threading.Thread(target=lambda: _follow(sse, f"{url}/jobs/{job_id}/events"))
    reader.start()
    deadline = time.monotonic() + 10
    while not sse.events:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    lonely.broker.stop()
    comments_before = sse.comments
    assert httpx.get(f"{url}/healthz").status_code == 503
    late = Sse()
    late_reader = threading.Thread(target=lambda: _follow(late, f"{url}/jobs/{job_id}/events"))
    late_reader.start()
    for path, kind in (
        ("/", "text/html"),
        (f"/jobs/{job_id}", "text/html"),
        ("/metrics", "application/json"),
    ):
        reply = httpx.get(f"{url}{path}", timeout=10)
        assert reply.status_code == 503, (path, reply.text)
        assert reply.headers["content-type"].startswith(kind), path
        assert "Redis is not answering" in reply.text, path
    deadline = time.monotonic() + 20
    while sse.comments <= comments_before:  # the stream waits, with keep-alives
        assert reader.is_alive() and time.monotonic() < deadline, "no keep-alive came"
        time.sleep(0.05)
    assert reader.is_alive()

    lonely.broker.start()
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/healthz").status_code != 200:
        assert time.monotonic() < deadline, "/healthz never recovered"
        time.sleep(0.1)
    for path in ("/", f"/jobs/{job_id}", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    events = EventPublisher(client, JobIndex(client))
    events.publish(
        job_id,
        StageFinished(
            status="failed",
            total_images=1,
            successful_images=0,
            failed_images=1,
            total_cost=Decimal(0),
            total_time=3.0,
            result_status="text_only",
        ),
    )
    reader.join(timeout=20)
    assert not reader.is_alive() and sse.ended  # the same connection, to the final event
    assert [m["event_type"] for m in sse.messages] == ["stage_update", "stage_update"]
    late_reader.join(timeout=20)
    assert not late_reader.is_alive() and late.ended
    assert late.events == sse.events
    assert sse.messages[-1]["data"]["result_status"] == "text_only"
    client.close()

    lines = log_lines(lonely.log)
    text = lonely.log.read_text()
    assert "Traceback" not in text
    assert {line["event"] for line in lines if line["level"] in ("warning", "error")} == {
        "redis_lost",
        "redis_unavailable",
    }
    assert any(line["event"] == "redis_back" for line in lines)


def _follow(sse: Sse, url: str) -> None:
    with httpx.stream("GET", url, timeout=30) as response:
        sse.read(response)
