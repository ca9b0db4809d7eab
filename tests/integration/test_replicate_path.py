"""Whole jobs on the Replicate path: real ``refgen worker`` processes, a real chord, the
Replicate-like server, and faults caused for real (a SIGKILLed worker, a prediction that
never gets hardware). Each test starts the workers it needs, with the settings it needs."""

from __future__ import annotations

import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.harness import JobRun, JobRunner, WorkerProcess, replicate_worker_env
from tasks.localredis import RedisServer
from tests.fakes.replicate_server import CreateCall, FakeReplicate, PredictionPlan
from worker import constants as c
from worker.budget import from_nano, to_nano
from worker.errors import CancelledError
from worker.generation import GenerationRequest
from worker.generation.checkpoints import RedisPredictionCheckpoints
from worker.generation.replicate import ReplicateImageGenerator
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
PRICE = c.DEFAULT_HARDWARE_PRICE_PER_S
ROOFTOP = "Windswept rooftop"  # only the rooftop scene's prompt contains it


@pytest.fixture(scope="module")
def token() -> str:
    return "r8_" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def fake(token: str) -> Iterator[FakeReplicate]:
    with FakeReplicate(api_token=token) as server:
        yield server


@pytest.fixture
def runner(broker: RedisServer) -> JobRunner:
    return JobRunner(broker.url)


@pytest.fixture
def start_worker(
    broker: RedisServer, token: str, runner: JobRunner, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(replicate: FakeReplicate, name: str = "w", **env: str) -> WorkerProcess:
        environment = replicate_worker_env(broker.url, tmp_path / "storage", replicate.url, token)
        environment.update(env)
        worker = WorkerProcess(environment, tmp_path / f"{name}.log", name)
        started.append(worker.start(runner.client))
        return worker

    yield start
    for worker in started:
        worker.stop()


def creates_for(fake: FakeReplicate, text: str) -> list[CreateCall]:
    return [call for call in fake.creates if text in call.input["prompt"]]


def the_jobs_requests(fake: FakeReplicate) -> list[str]:
    """The routes of the API requests after the worker's warm-up, which opens a connection
    per slot with ``GET /v1/account`` as it starts, before the job."""
    routes = [r.route for r in fake.api_requests]
    warm = routes.count("account")
    assert warm >= 1 and routes[:warm] == ["account"] * warm, routes
    return routes[warm:]


def job_bills(fake: FakeReplicate) -> Decimal:
    """What the server billed for the test's job: every prediction it was asked for, each
    rounded up to the nano-dollar as the ledger records money."""
    bills = fake.bills(PRICE)
    return sum((from_nano(to_nano(bills[call.prediction_id])) for call in fake.creates), Decimal(0))


def in_background(runner: JobRunner, plan: dict[str, Any], **kwargs: Any) -> Callable[[], JobRun]:
    box: list[JobRun] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(runner(plan, **kwargs))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> JobRun:
        thread.join(timeout=kwargs.get("timeout_s", 60) + 35)
        if errors:
            raise errors[0]
        assert box, "the job never ended"
        return box[0]

    return join


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ----------------------------------------------------------------------- the common case
def test_one_api_request_per_image(fake, start_worker, runner, load_plan) -> None:
    start_worker(fake)
    fake.default_plan = PredictionPlan(duration=1.0, predict_time=0.7)
    run = runner(load_plan("typical_2x2"), duration_seconds=180)

    assert run.result["status"] == "success"
    assert the_jobs_requests(fake) == ["create"] * 4  # no poll, no list
    assert {call.prefer for call in fake.creates} == {"wait=60"}  # Replicate's maximum
    assert {call.cancel_after for call in fake.creates} == {"120s"}
    assert Decimal(run.result["total_cost"]) == job_bills(fake) == 4 * Decimal("0.7") * PRICE


# ----------------------------------------------------------------------- deadlines
def test_a_prediction_that_never_starts_is_aborted_unbilled_and_retried(
    fake, start_worker, runner, load_plan
) -> None:
    start_worker(fake, IMAGE_TIMEOUT_S="2")
    fake.script_next_prediction(starting_for=60, duration=70, prompt_contains=ROOFTOP)
    run = runner(load_plan("typical_2x2"))

    assert run.result["status"] == "success"
    first, second = creates_for(fake, ROOFTOP)
    assert first.cancel_after == "2s"
    assert fake.status(first.prediction_id) == "aborted"
    assert fake.bills(PRICE)[first.prediction_id] == 0
    retry = run.of("reference_generation_retry", image_id="rooftop")
    assert len(retry) == 1 and "before Replicate started the image" in retry[0]["reason"]
    assert retry[0]["retry_in_s"] == 2.0
    done = run.of("reference_generation_complete", image_id="rooftop")
    assert done[0]["retry_count"] == 1 and fake.status(second.prediction_id) == "succeeded"
    assert Decimal(run.result["total_cost"]) == job_bills(fake)  # the abort cost nothing


def test_a_prediction_aborted_twice_fails_its_image_at_no_cost(
    fake, start_worker, runner, load_plan
) -> None:
    start_worker(fake, IMAGE_TIMEOUT_S="2")
    for _ in range(2):
        fake.script_next_prediction(starting_for=60, duration=70, prompt_contains=ROOFTOP)
    run = runner(load_plan("typical_2x2"))

    assert run.result["status"] == "partial"
    failed = run.of("reference_generation_failed", image_id="rooftop")
    assert failed[0]["retry_count"] == 1
    assert "before Replicate started the image (not billed)" in failed[0]["reason"]
    aborted = creates_for(fake, ROOFTOP)
    assert [fake.status(call.prediction_id) for call in aborted] == ["aborted", "aborted"]
    assert Decimal(run.result["total_cost"]) == job_bills(fake) == 3 * Decimal("2.5") * PRICE


def test_a_killed_workers_prediction_ends_at_its_deadline(
    fake, start_worker, runner, load_plan
) -> None:
    """Nobody is left to cancel it: Replicate does, at the deadline sent with the create."""
    env = {"IMAGE_TIMEOUT_S": "3", "LEASE_TTL_S": "4"}
    doomed = start_worker(fake, "doomed", **env)
    fake.script_next_prediction(outcome="hang", starting_for=0.2, prompt_contains=ROOFTOP)
    join = in_background(runner, load_plan("typical_2x2"), timeout_s=90)
    wait_for(lambda: bool(creates_for(fake, ROOFTOP)), 30, "the rooftop's create")
    hung = creates_for(fake, ROOFTOP)[0].prediction_id
    wait_for(lambda: fake.status(hung) == "processing", 30, "the rooftop running")
    assert doomed.process is not None
    os.killpg(doomed.process.pid, signal.SIGKILL)  # while its sync create is held open
    doomed.process.wait()
    wait_for(lambda: fake.status(hung) != "processing", 30, "the deadline")
    assert fake.status(hung) == "canceled"
    # Ended by the deadline sent with the create, at exactly that point of its own timeline,
    # not by anyone's cancel.
    assert creates_for(fake, ROOFTOP)[0].cancel_after == "3s"
    assert fake.ended_after_s(hung) == 3.0
    assert fake.cancels == []
    assert fake.bills(PRICE)[hung] == Decimal("2.8") * PRICE  # the time it ran

    start_worker(fake, "rescuer", **env)  # the job still ends
    run = join()
    assert run.result["status"] == "success"
    assert run.of("reference_generation_complete", image_id="rooftop")[0]["retry_count"] == 1


def test_a_create_held_open_when_its_worker_dies_is_adopted_not_repeated(
    fake, start_worker, runner, load_plan
) -> None:
    # A slot for each image and one for start, so that every image is received (in kombu's
    # unacked set) before the kill: one popped from the queue and not yet recorded there is
    # lost with the worker, a limit of kombu's Redis transport this test is not about
    # (README: Reliability, what can still be lost).
    doomed = start_worker(fake, "doomed", LEASE_TTL_S="4", REFERENCE_GEN_CONCURRENCY="5")
    fake.script_next_prediction(duration=4.0, predict_time=3.5, prompt_contains=ROOFTOP)
    plan = load_plan("typical_2x2")
    join = in_background(runner, plan, timeout_s=90)
    wait_for(lambda: bool(creates_for(fake, ROOFTOP)), 30, "the rooftop's create")
    taken = re.compile(r"generate_reference\[\S+\] received")
    wait_for(lambda: len(taken.findall(doomed.log_path.read_text())) == 4, 30, "every image taken")
    assert doomed.process is not None
    os.killpg(doomed.process.pid, signal.SIGKILL)  # the server holds the create (a 4 s run)
    rescuer = start_worker(fake, "rescuer", LEASE_TTL_S="4")

    run = join()
    assert run.result["status"] == "success"
    rooftop = creates_for(fake, ROOFTOP)
    assert len(rooftop) == 1, "the redelivered image paid for a second prediction"
    assert len(fake.creates) == 4  # one per image, whatever the kill interrupted
    assert fake.requests_for("list"), "the rescuer looked the prediction up"
    assert '"prediction_adopted"' in rescuer.log_path.read_text()
    assert Decimal(run.result["total_cost"]) == job_bills(fake)


def test_at_the_job_deadline_what_runs_is_cancelled_and_its_bill_committed(
    fake, start_worker, runner, load_plan, broker, token, monkeypatch
) -> None:
    """Issue 20, item 2: the rooftop's prediction still runs at the job's deadline. It is
    cancelled, its run time is charged before the result is committed, and nothing is
    paid after: the committed cost is what Replicate billed, and stays so."""
    start_worker(fake, JOB_DEADLINE_S="4")
    fake.default_plan = PredictionPlan(duration=0.6, predict_time=0.5)
    fake.script_next_prediction(duration=60, starting_for=0.1, prompt_contains=ROOFTOP)
    run = runner(load_plan("typical_2x2"), duration_seconds=180)

    (rooftop,) = [call.prediction_id for call in creates_for(fake, ROOFTOP)]
    assert fake.cancels == [rooftop] and fake.status(rooftop) == "canceled"
    assert len(fake.creates) == 4
    assert run.result is not None
    assert (run.result["status"], run.result["total_references"]) == ("partial", 3)
    committed = Decimal(run.result["total_cost"])
    assert committed == job_bills(fake) > 3 * Decimal("0.5") * PRICE
    final = run.events[-1][1]
    assert Decimal(str(final["total_cost"])) == committed
    assert (final["successful_images"], final["failed_images"]) == (3, 1)
    assert fake.bills(PRICE)[rooftop] > 0  # it ran, and that was charged
    # A delivery of the rooftop that had passed its state check before the commit (waiting
    # for the request budget, say) cannot create once the job has ended.
    monkeypatch.setenv("REPLICATE_BASE_URL", fake.url)
    settings = Settings(replicate_api_token=token, storage_backend="local")
    checkpoints = RedisPredictionCheckpoints(
        redis.Redis.from_url(broker.url, decode_responses=True)
    )
    late = ReplicateImageGenerator.from_settings(settings, checkpoints)
    spec = GenerationRequest(
        job_id=run.job_id,
        image_id="rooftop",
        image_key="scene_rooftop",
        prompt=fake.creates[0].input["prompt"],
        negative_prompt="",
        seed=1,
        attempt=1,
    )
    with pytest.raises(CancelledError):
        late.generate(spec)
    assert len(fake.creates) == 4


# ----------------------------------------------------------------------- realistic latency
@pytest.mark.realistic
def test_a_whole_job_at_realistic_latency(token, start_worker, runner, load_plan) -> None:
    """SDXL takes 5–10 s an image: the job takes as long as its slowest image, and each
    image still costs one API request."""
    with FakeReplicate(api_token=token, duration_range=(5.0, 10.0), seed=7) as fake:
        start_worker(fake)
        run = runner(load_plan("typical_2x2"), duration_seconds=180, timeout_s=60)
        durations = [fake.ended_after_s(call.prediction_id) for call in fake.creates]

    assert run.result["status"] == "success"
    assert len(durations) == 4 and all(d is not None and 5.0 <= d <= 10.0 for d in durations)
    # Side by side: every image had started before the first one was done.
    kinds = [kind for kind, _ in run.events]
    assert kinds.count(c.EVENT_IMAGE_START) == 4
    assert max(i for i, k in enumerate(kinds) if k == c.EVENT_IMAGE_START) < kinds.index(
        c.EVENT_IMAGE_COMPLETE
    )
    assert the_jobs_requests(fake) == ["create"] * 4
    # Each image's reported time covers its prediction's run: the held create answered
    # only once it was done (the pairing is by rank: no image finishes before its own).
    times = [e["generation_time"] for e in run.of("reference_generation_complete")]
    assert all(t >= d for t, d in zip(sorted(times), sorted(durations), strict=True))
    assert Decimal(run.result["total_cost"]) == job_bills(fake)


def test_a_job_that_cannot_pass_cancels_what_runs_and_ends_at_once(
    fake, runner, start_worker, load_plan
) -> None:
    """Both scenes are rejected at once; the characters' predictions, 20 s long, are in
    flight. The job can no longer pass: they are cancelled, the job ends text-only without
    waiting for them, and its recorded cost is what the server billed for what ran."""
    start_worker(fake, IMAGE_TIMEOUT_S="60")
    fake.default_plan = PredictionPlan(duration=20.0, starting_for=0.2, predict_time=20.0)
    for text in ("Rain-slicked", ROOFTOP):
        fake.script_next_prediction(outcome="failed", duration=1.0, prompt_contains=text)
    plan = load_plan("typical_2x2")
    run = runner(plan, timeout_s=60)
    # The job has ended; on the server's timeline the characters' 20 s runs have not.
    ages = {call.prediction_id: fake.age_s(call.prediction_id) for call in fake.creates}

    assert run.result is None
    final = run.events[-1][1]
    assert (final["status"], final["result_status"]) == ("failed", "text_only")
    characters = [
        call.prediction_id
        for call in fake.creates
        if "Rain" not in call.input["prompt"] and ROOFTOP not in call.input["prompt"]
    ]
    assert len(characters) == 2 and set(characters) <= set(fake.cancels)
    reasons = {d["image_id"]: d["reason"] for d in run.of("reference_generation_failed")}
    assert reasons["protagonist"].startswith("Cancelled, to save money: every scene image failed")
    assert reasons["antagonist"].startswith("Cancelled, to save money: every scene image failed")
    # Cancelled before their natural end, and the job did not wait for it.
    assert [fake.status(p) for p in characters] == ["canceled", "canceled"]
    assert all(ages[p] < 20 for p in characters), ages
    ledger = runner.client.backend.client.hgetall(f"refgen:job:{{{plan['job_id']}}}:ledger")
    spent = Decimal(int(ledger[b"spent"])) / 10**9
    assert spent == job_bills(fake) > 0  # the scenes' failed runs and the cancelled runs
    assert Decimal(final["total_cost"]) == spent
