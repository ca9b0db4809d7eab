"""The Replicate generator through the official client against a local Replicate-like server,
with its checkpoints in a real redis-server."""

from __future__ import annotations

import itertools
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal

import pytest
import redis
from structlog.testing import capture_logs

from tests.fakes._http import Fault
from tests.fakes.replicate_server import FakeReplicate
from worker import constants as c
from worker.errors import (
    ContentRejectedError,
    ImageTimeoutError,
    PermanentError,
    RefgenError,
    RetryableError,
)
from worker.generation import GenerationRequest
from worker.generation.checkpoints import RedisPredictionCheckpoints
from worker.generation.replicate import ReplicateImageGenerator
from worker.settings import Settings

pytestmark = pytest.mark.integration
PRICE = c.DEFAULT_HARDWARE_PRICE_PER_S


@pytest.fixture
def token() -> str:
    return "r8_" + secrets.token_hex(16)  # made at run time, never committed


@pytest.fixture
def fake(token: str) -> Iterator[FakeReplicate]:
    with FakeReplicate(api_token=token) as server:
        yield server


@pytest.fixture
def checkpoints(redis_client: redis.Redis) -> RedisPredictionCheckpoints:
    return RedisPredictionCheckpoints(redis_client, ttl_s=3600)


@pytest.fixture
def job_id() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


def build(
    fake: FakeReplicate,
    token: str,
    checkpoints: RedisPredictionCheckpoints,
    monkeypatch: pytest.MonkeyPatch,
    **kwargs: object,
) -> ReplicateImageGenerator:
    monkeypatch.setenv("REPLICATE_BASE_URL", fake.url)  # the client's own variable
    environment = kwargs.pop("environment", "production")
    settings = Settings(replicate_api_token=token, environment=environment, storage_backend="local")
    return ReplicateImageGenerator.from_settings(settings, checkpoints, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def generator(fake, token, checkpoints, monkeypatch) -> ReplicateImageGenerator:
    return build(fake, token, checkpoints, monkeypatch)


@pytest.fixture
def request_for(job_id: str):
    def make(deadline_s: float = 10, prompt: str = "a neon street", attempt: int = 0):
        return GenerationRequest(
            job_id=job_id,
            image_id="street",
            image_key="scene_street",
            prompt=prompt,
            negative_prompt=c.NEGATIVE_PROMPT,
            seed=42,
            attempt=attempt,
            deadline_s=deadline_s,
        )

    return make


def billed_by(error: RefgenError) -> Decimal:
    assert error.billed is not None, "an error after a paid call carries its bill"
    return error.billed.cost


# ----------------------------------------------------------------------- the common case
def test_one_request_per_image_with_exact_version_inputs_and_deadline(
    generator, fake, request_for
) -> None:
    image = generator.generate(request_for(deadline_s=10))
    assert [r.route for r in fake.api_requests] == ["create"]  # sync mode: nothing to poll
    call = fake.creates[0]
    assert call.path == "/v1/predictions"
    assert call.version_field == c.SDXL_VERSION
    # Whole seconds: the hold never outlasts the time left, the deadline never falls short.
    assert call.prefer == "wait=9" and call.cancel_after == "10s"
    assert call.input == {
        "prompt": "a neon street",
        "negative_prompt": c.NEGATIVE_PROMPT,
        "width": 1024,
        "height": 1024,
        "num_outputs": 1,
        "scheduler": "K_EULER",
        "num_inference_steps": 40,
        "guidance_scale": 7.5,
        "apply_watermark": False,
        "seed": 42,
    }
    assert image.png.startswith(b"\x89PNG")
    assert image.cost == Decimal("2.5") * PRICE == fake.billed(PRICE)
    assert not image.cost_is_fallback
    assert image.prediction_id == call.prediction_id


def test_sync_wait_is_capped_at_60_s_and_the_deadline_is_rounded_up(
    generator, fake, request_for
) -> None:
    generator.generate(request_for(deadline_s=120.4))
    assert (fake.creates[0].prefer, fake.creates[0].cancel_after) == ("wait=60", "121s")


def test_development_uses_25_steps(fake, token, checkpoints, monkeypatch, request_for) -> None:
    build(fake, token, checkpoints, monkeypatch, environment="development").generate(request_for())
    assert fake.creates[0].input["num_inference_steps"] == 25


def test_missing_predict_time_falls_back_to_flat_price(generator, fake, request_for) -> None:
    fake.script_next_prediction(predict_time=None)
    image = generator.generate(request_for())
    assert (image.cost, image.cost_is_fallback) == (Decimal("0.005"), True)


def test_an_answer_that_is_not_final_is_polled_less_and_less_often(
    generator, fake, request_for, monkeypatch
) -> None:
    # A server that answers the held create early (as Replicate may once outputs exist).
    monkeypatch.setattr(fake, "_hold", lambda pred, until: time.sleep(0.2))
    fake.script_next_prediction(duration=1.8, starting_for=0.1)
    image = generator.generate(request_for(deadline_s=10))
    gets = [r.timestamp for r in fake.requests_for("get")]
    gaps = [b - a for a, b in itertools.pairwise(gets)]
    assert len(gets) == 3  # at 0.45, 0.95, 1.95 s: the third sees it finished
    assert gaps == sorted(gaps) and gaps[-1] > 1.5 * gaps[0]
    assert image.prediction_id == fake.creates[0].prediction_id


# ----------------------------------------------------------------------- errors
def test_429_on_create_carries_retry_after(generator, fake, request_for) -> None:
    fake.throttle_next_creates(retry_after=3)
    with pytest.raises(RetryableError) as info:
        generator.generate(request_for())
    assert info.value.retry_after_s == 3.0
    assert info.value.reason == "Rate limited by Replicate"
    assert info.value.billed is None  # nothing was created


def test_5xx_is_retryable_and_401_is_not(generator, fake, request_for) -> None:
    fake.fail_next_creates(status=500)
    with pytest.raises(RetryableError, match="HTTP 500"):
        generator.generate(request_for())
    fake.api_token = "r8_" + secrets.token_hex(16)
    with pytest.raises(PermanentError, match="HTTP 401") as info:
        generator.generate(request_for(attempt=1))
    assert not isinstance(info.value, RetryableError)


def test_nsfw_failure_is_a_content_rejection_and_is_billed(generator, fake, request_for) -> None:
    fake.fail_next_prediction()
    with pytest.raises(ContentRejectedError, match="NSFW") as info:
        generator.generate(request_for())
    assert billed_by(info.value) == Decimal("2.5") * PRICE == fake.billed(PRICE)
    assert info.value.billed.ref == fake.creates[0].prediction_id


def test_wrong_output_size_is_refused_and_billed(generator, fake, request_for) -> None:
    from tests.fakes.replicate_server import make_png

    fake.script_next_prediction(image_bytes=make_png(512, 512))
    with pytest.raises(PermanentError, match="512×512") as info:
        generator.generate(request_for())
    assert billed_by(info.value) == fake.billed(PRICE) > 0


def test_a_hung_create_times_out_instead_of_blocking(
    fake, token, checkpoints, monkeypatch, request_for
) -> None:
    generator = build(fake, token, checkpoints, monkeypatch, http_timeout_s=1)
    fake.delay_next("create", seconds=30)
    with pytest.raises(RetryableError, match="did not answer in time"):
        generator.generate(request_for(deadline_s=2))  # held at most 2 s, read timeout 2 + 1
    # It gave up while the server still held the create: no prediction was made yet.
    assert fake.create_count == 1 and fake.creates == []


def test_the_token_never_reaches_the_output_host(generator, fake, token, request_for) -> None:
    generator.generate(request_for())
    downloads = fake.requests_for(route="file")
    assert downloads
    assert all("authorization" not in r.headers for r in downloads)


# ----------------------------------------------------------------------- deadlines
def test_a_deadline_before_the_start_aborts_unbilled(generator, fake, request_for) -> None:
    fake.script_next_prediction(starting_for=30, duration=40)  # no hardware free in time
    with pytest.raises(ImageTimeoutError, match="before Replicate started the image") as info:
        generator.generate(request_for(deadline_s=1.5))
    pid = fake.creates[0].prediction_id
    # Ended by its deadline, and known from the create's answer long before the hardware
    # would have come (30 s into its timeline).
    assert fake.creates[0].cancel_after == "2s"  # 1.5 s, in the header's whole seconds
    assert fake.status(pid) == "aborted" and fake.ended_after_s(pid) == 2.0
    assert fake.age_s(pid) < 30
    assert billed_by(info.value) == 0 == fake.billed(PRICE)
    assert fake.cancels == []  # Replicate ended it: nothing for the worker to cancel


def test_a_deadline_while_running_is_enforced_by_replicate_and_billed(
    generator, fake, request_for
) -> None:
    fake.script_next_prediction(outcome="hang", starting_for=0.3)
    with pytest.raises(ImageTimeoutError, match=r"^Timed out after 2 s$") as info:
        generator.generate(request_for(deadline_s=2))
    pid = fake.creates[0].prediction_id
    assert fake.status(pid) == "canceled"
    assert fake.cancels == []
    assert billed_by(info.value) == fake.bills(PRICE)[pid] > 0  # the 1.7 s it ran


def test_a_server_ignoring_the_deadline_gets_an_explicit_cancel(
    generator, fake, request_for
) -> None:
    fake.honour_cancel_after = False
    # It would run 30 s and succeed: only a cancel sent long before that ends it "canceled".
    fake.script_next_prediction(starting_for=0.2, duration=30, predict_time=30)
    with pytest.raises(ImageTimeoutError, match=r"Timed out after 1 s") as info:
        generator.generate(request_for(deadline_s=1))
    pid = fake.creates[0].prediction_id
    assert fake.cancels == [pid] and fake.status(pid) == "canceled"
    ended = fake.ended_after_s(pid)  # on the server's clock: the deadline, the grace, the cancel
    assert ended is not None and 1 <= ended < 30
    assert billed_by(info.value) == fake.bills(PRICE)[pid] > 0  # read back after the cancel


def test_an_exception_while_waiting_cancels_the_prediction(
    generator, fake, request_for, monkeypatch
) -> None:
    monkeypatch.setattr(fake, "_hold", lambda pred, until: None)  # answers at once
    fake.hang_next_prediction()
    fake.fail_next_gets(status=404)  # the first poll breaks
    with pytest.raises(PermanentError, match="HTTP 404") as info:
        generator.generate(request_for())
    pid = fake.creates[0].prediction_id
    assert fake.cancels == [pid]
    assert info.value.billed is not None and info.value.billed.ref == pid


# ----------------------------------------------------------------------- crash safety
def test_a_saved_prediction_is_resumed_not_created_again(
    generator, fake, checkpoints, job_id, request_for
) -> None:
    fake.script_next_prediction(duration=1.0)
    first = create_directly(generator, request_for())
    checkpoints.save_intent(job_id, "scene_street", 0)
    checkpoints.save_prediction(job_id, "scene_street", 0, first)
    image = generator.generate(request_for())
    assert fake.create_count == 1
    assert image.prediction_id == first


def test_a_failed_saved_prediction_is_this_attempts_failure_not_a_new_create(
    generator, fake, checkpoints, job_id, request_for
) -> None:
    fake.fail_next_prediction(error="CUDA out of memory")
    first = create_directly(generator, request_for())
    time.sleep(0.5)
    checkpoints.save_intent(job_id, "scene_street", 0)
    checkpoints.save_prediction(job_id, "scene_street", 0, first)
    with pytest.raises(PermanentError, match="CUDA out of memory") as info:
        generator.generate(request_for(attempt=0))
    assert fake.create_count == 1 and billed_by(info.value) > 0
    image = generator.generate(request_for(attempt=1))  # the next attempt starts afresh
    assert fake.create_count == 2 and image.prediction_id != first


def test_an_intent_without_an_id_adopts_the_prediction_it_created(
    generator, fake, checkpoints, job_id, request_for
) -> None:
    """The worker died while its create was held open: the create went out, its answer was
    lost. The next delivery finds the prediction by its input instead of paying again."""
    fake.page_size = 2  # the match is on a later page
    checkpoints.save_intent(job_id, "scene_street", 0)
    lost = create_directly(generator, request_for())
    for i in range(3):  # the account is busy meanwhile
        create_directly(generator, request_for(prompt=f"another job {i}"))
    image = generator.generate(request_for())
    assert image.prediction_id == lost
    assert fake.create_count == 4  # no fifth
    assert [cp.prediction_id for cp in checkpoints.load(job_id)] == [lost]


def test_adoption_reads_back_to_the_intent_however_busy_the_account_and_its_clock(
    generator, fake, checkpoints, redis_client, job_id, request_for
) -> None:
    """Issue 20, item 6: the search goes back to the intent's time, not a number of pages,
    with a margin for Redis's clock running ahead of Replicate's."""
    fake.page_size = 2
    checkpoints.save_intent(job_id, "scene_street", 0)
    ahead = f"{time.time() + 5:.6f}"  # Redis's clock 5 s ahead of Replicate's
    redis_client.hset(c.JobKeys(job_id).predictions, "scene_street#0:intent", ahead)
    lost = create_directly(generator, request_for())
    for i in range(12):  # six pages of the account's other work since
        create_directly(generator, request_for(prompt=f"another job {i}"))
    image = generator.generate(request_for())
    assert image.prediction_id == lost and fake.create_count == 13


def test_an_intent_whose_create_never_arrived_creates_once(
    generator, fake, checkpoints, job_id, request_for
) -> None:
    checkpoints.save_intent(job_id, "scene_street", 0)
    # An older prediction with the same input (an earlier attempt) is not this intent's.
    image = generator.generate(request_for())
    assert fake.create_count == 1
    assert [r.route for r in fake.api_requests] == ["list", "create"]
    assert checkpoints.load(job_id)[0].prediction_id == image.prediction_id


@pytest.mark.parametrize("disconnect", [False, True], ids=["edge-502", "connection-closed"])
def test_a_create_whose_answer_was_lost_is_adopted_by_the_next_attempt(
    generator, fake, checkpoints, job_id, request_for, disconnect
) -> None:
    """Issue 20, item 1: the create reached Replicate, which made and billed the prediction;
    its answer was lost. The retry (the next attempt, another delivery) finds it by the
    intent the lost attempt left, instead of paying for a second prediction."""
    fake.script_next_prediction(duration=0.6, predict_time=0.5)
    fake.lose_next_create_answers(delay=0.1, disconnect=disconnect)
    with pytest.raises(RetryableError) as info:
        generator.generate(request_for(attempt=0))
    assert info.value.billed is None  # nothing known to bill yet: the retry will find it
    (lost,) = [call.prediction_id for call in fake.creates]
    image = generator.generate(request_for(attempt=1))
    assert image.prediction_id == lost
    assert len(fake.creates) == 1 and fake.cancels == []
    assert image.cost == fake.bills(PRICE)[lost]
    saved = {cp.attempt: cp.prediction_id for cp in checkpoints.load(job_id)}
    assert saved[0] == lost  # the lost attempt's intent now names what it made


def test_a_lost_create_found_after_its_retry_created_is_cancelled_and_billed(
    generator, fake, checkpoints, job_id, request_for
) -> None:
    """A lost create that only shows up on Replicate after the retry had to create again
    (it was still in transit when the retry searched) is swept at the job's end: cancelled
    and its bill reported, so that the ledger holds what Replicate billed."""
    checkpoints.save_intent(job_id, "scene_street", 0)
    image = generator.generate(request_for(attempt=1))  # searched: nothing, so created
    fake.script_next_prediction(duration=30, starting_for=0.1)
    late = create_directly(generator, request_for())  # the lost create lands only now
    wait_until(lambda: fake.prediction_json(late)["status"] == "processing")
    ((image_key, bill),) = generator.sweep_lost(job_id, [request_for()])
    assert (image_key, bill.ref) == ("scene_street", late)
    assert fake.cancels == [late] and fake.status(late) == "canceled"
    assert bill.cost == fake.bills(PRICE)[late] > 0
    assert image.prediction_id != late
    assert generator.sweep_lost(job_id, [request_for()]) == []  # once


def test_an_earlier_attempts_failed_prediction_is_never_adopted(
    generator, fake, checkpoints, job_id, request_for
) -> None:
    fake.script_next_prediction(outcome="failed", error="CUDA out of memory")
    with pytest.raises(PermanentError):
        generator.generate(request_for(attempt=0))
    first = fake.creates[0].prediction_id
    checkpoints.save_intent(job_id, "scene_street", 1)  # attempt 1 died before its create
    second = generator.generate(request_for(attempt=1)).prediction_id
    # The same prompt and seed: a listing would match it, but it belongs to attempt 0.
    assert second != first and fake.create_count == 2


def test_an_earlier_attempts_successful_prediction_is_taken_not_paid_again(
    generator, fake, checkpoints, job_id, request_for
) -> None:
    """Attempt 0 made the image and failed afterwards (its upload): attempt 1 takes the same
    prediction's output, still on Replicate, instead of paying for the image again."""
    first = generator.generate(request_for(attempt=0)).prediction_id
    second = generator.generate(request_for(attempt=1)).prediction_id
    assert second == first and fake.create_count == 1


# ----------------------------------------------------------------------- a doomed job
def test_cancel_in_flight_stops_a_held_create_and_its_delivery_fails_billed(
    generator, fake, checkpoints, job_id, request_for
) -> None:
    fake.script_next_prediction(outcome="hang", starting_for=0.1)
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            generator.generate(request_for(deadline_s=30))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=deliver)
    thread.start()
    while not fake.creates:
        time.sleep(0.01)
    time.sleep(0.5)
    cancelled = generator.cancel_in_flight(job_id, [request_for()])
    thread.join(timeout=5)
    pid = fake.creates[0].prediction_id
    assert cancelled == [pid] and fake.status(pid) == "canceled"
    assert len(errors) == 1 and isinstance(errors[0], PermanentError)
    assert errors[0].reason.startswith("Cancelled:")
    assert billed_by(errors[0]) == fake.bills(PRICE)[pid] > 0
    # The job creates nothing more, whichever delivery comes next.
    with pytest.raises(PermanentError, match=r"^Cancelled:") as info:
        generator.generate(request_for(attempt=1))
    assert info.value.billed is None and fake.create_count == 1


def test_cancel_in_flight_cancels_checkpointed_predictions_only_while_running(
    generator, fake, checkpoints, job_id, request_for
) -> None:
    done = generator.generate(request_for()).prediction_id  # finished: nothing to stop
    fake.hang_next_prediction()
    running = create_directly(generator, request_for(prompt="a pier"))
    checkpoints.save_intent(job_id, "scene_pier", 0)
    checkpoints.save_prediction(job_id, "scene_pier", 0, running)
    pier = GenerationRequest(job_id, "pier", "scene_pier", "a pier", c.NEGATIVE_PROMPT, seed=42)
    cancelled = generator.cancel_in_flight(job_id, [request_for(), pier])
    assert cancelled == [running]
    assert fake.status(done) == "succeeded" and fake.status(running) == "canceled"


def wait_until(predicate, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def create_directly(generator: ReplicateImageGenerator, request: GenerationRequest) -> str:
    """A prediction created behind the generator's back, as a dead worker's create was."""
    prediction = generator._api.create(
        c.SDXL_VERSION,
        generator.model_input(request),
        wait_s=None,
        cancel_after_s=60,
        until=time.monotonic() + 5,
    )
    return prediction.id


def test_the_warm_up_opens_one_connection_per_slot_and_the_creates_use_them(
    generator, fake, request_for
) -> None:
    generator.warm(3)
    opened = {r.client_port for r in fake.requests_for("account")}
    assert len(opened) == 3
    images = [
        replace(request_for(prompt=f"street {n}"), image_id=f"s{n}", image_key=f"scene_s{n}")
        for n in range(3)
    ]
    threads = [threading.Thread(target=generator.generate, args=(image,)) for image in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    creates = fake.requests_for("create")
    assert len(creates) == 3 and {r.client_port for r in creates} <= opened


def test_a_warm_up_refused_or_unanswered_is_logged_and_the_start_goes_on(
    fake, token, checkpoints, monkeypatch
) -> None:
    wrong = build(fake, "r8_" + secrets.token_hex(16), checkpoints, monkeypatch)
    with capture_logs() as lines:
        wrong.warm(2)  # 401s
        # A server that answers after the warm-up's own limit (3 s): had the warm-up waited
        # for it, both would have been answered.
        fake.inject("account", Fault(delay=5), times=2)
        build(fake, token, checkpoints, monkeypatch).warm(2)
    warnings = [line for line in lines if line["event"] == "replicate_warmup_incomplete"]
    assert [line["answered"] for line in warnings] == [0, 0]
    assert token not in repr(lines)


def test_a_warm_up_throttled_does_not_wait_out_the_retry_after(generator, fake) -> None:
    """The client's transport retries a GET answered 429 after its Retry-After (up to a
    minute); the worker's start does not wait for that retry."""
    fake.inject("account", Fault(status=429, headers={"Retry-After": "5"}), times=2)
    with capture_logs() as lines:
        generator.warm(2)
    assert [line["answered"] for line in lines if "answered" in line] == [0]
    assert len(fake.requests_for("account")) == 2  # returned before either retry was sent
