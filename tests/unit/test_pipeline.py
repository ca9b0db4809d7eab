"""One image through budget, generation, upload and events, with no Celery in the way."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from worker import constants as c
from worker.errors import DeliveryAbandoned
from worker.generation.local import LocalImageGenerator
from worker.jobs import MadeImage, Recorded
from worker.models import ImageOutcome, ImageSpec
from worker.pipeline import HeldElsewhere, ImagePipeline, RetryIn, Step
from worker.services import Services
from worker.settings import Settings
from worker.storage.local import LocalImageStore


class CountingGenerator(LocalImageGenerator):
    calls = 0

    def generate(self, request):  # type: ignore[no-untyped-def]
        type(self).calls += 1
        return super().generate(request)


@pytest.fixture
def services(redis_client, tmp_path: Path) -> Services:
    CountingGenerator.calls = 0
    return Services.build(
        Settings(generator_backend="local", storage_backend="local"),
        client=redis_client,
        generator=CountingGenerator(latency_s=0, fail_ids={"doomed"}, flaky_ids={"flaky"}),
        store=LocalImageStore(tmp_path),
    )


def spec(image_id: str = "street", total: int = 2) -> ImageSpec:
    return ImageSpec(
        job_id=str(uuid.uuid4()),
        image_type="scene",
        image_id=image_id,
        prompt=f"a {image_id}",
        negative_prompt="n",
        seed=7,
        index=1,
        total=total,
    )


def made(step: Step) -> ImageOutcome:
    assert isinstance(step, Recorded), step
    return step.outcome


def events(redis_client, job_id: str):
    listener = redis_client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(c.events_channel(job_id))
    return listener


def drain(listener) -> list[tuple[str, dict]]:
    out, quiet = [], 0
    while quiet < 2:  # an ignored subscribe confirmation also reads as None
        message = listener.get_message(timeout=0.2)
        if message is None:
            quiet += 1
            continue
        quiet = 0
        body = json.loads(message["data"])
        out.append((body["event_type"], body["data"]))
    return out


def test_success_stores_charges_and_announces(services: Services, redis_client) -> None:
    image = spec()
    listener = events(redis_client, image.job_id)
    services.ledger.open(image.job_id, None)
    outcome = made(ImagePipeline(services).run(image, attempt=0))
    assert outcome.ok
    assert services.store.exists(image.storage_path)
    assert services.ledger.totals(image.job_id).spent == Decimal("0.005")
    kinds = [e for e, _ in drain(listener)]
    assert kinds == ["reference_generation_start", "reference_generation_complete", "progress"]


def test_a_done_image_is_never_made_again(services: Services) -> None:
    image = spec()
    services.ledger.open(image.job_id, None)
    first = made(ImagePipeline(services).run(image, attempt=0))
    again = made(ImagePipeline(services).run(image, attempt=0))
    assert again == first
    assert CountingGenerator.calls == 1
    assert services.ledger.totals(image.job_id).spent == Decimal("0.005")


def test_a_delivery_whose_lock_was_taken_over_before_it_paid_pays_nothing(
    services: Services, redis_client
) -> None:
    """Its lock expired (the worker froze) and another delivery took it, before this one's
    heartbeat could notice: the reservation, which checks the lock in the same step, is
    refused, and nothing is generated or charged."""
    image = spec()
    services.ledger.open(image.job_id, None)
    held_here = services.locks.token_if_held

    def taken_over_meanwhile(lock):  # type: ignore[no-untyped-def]
        held = held_here(lock)
        redis_client.set(str(lock.name), b"another delivery's token")
        return held

    services.locks.token_if_held = taken_over_meanwhile  # type: ignore[method-assign]
    with pytest.raises(DeliveryAbandoned, match="took this image over"):
        ImagePipeline(services).run(image, attempt=0)
    assert CountingGenerator.calls == 0
    totals = services.ledger.totals(image.job_id)
    assert (totals.spent, totals.reserved) == (0, 0)
    assert not redis_client.hlen(c.JobKeys(image.job_id).reservations)


def test_transient_failure_asks_for_a_retry_in_2_s(services: Services, redis_client) -> None:
    image = spec("flaky")
    listener = events(redis_client, image.job_id)
    services.ledger.open(image.job_id, None)
    step = ImagePipeline(services).run(image, attempt=0)
    assert step == RetryIn(delay_s=2.0, reason=step.reason)  # type: ignore[union-attr]
    assert services.ledger.totals(image.job_id).reserved == Decimal(0)  # released
    outcome = made(ImagePipeline(services).run(image, attempt=1))
    assert outcome.ok and outcome.retry_count == 1
    kinds = [e for e, _ in drain(listener)]
    assert kinds == [
        "reference_generation_start",
        "reference_generation_retry",
        "reference_generation_complete",
        "progress",
    ]


def test_last_attempt_failure_is_an_outcome_not_an_exception(services: Services) -> None:
    image = spec("doomed")
    services.ledger.open(image.job_id, None)
    outcome = made(ImagePipeline(services).run(image, attempt=1))
    assert not outcome.ok and outcome.retry_count == 1
    assert "temporarily unavailable" in (outcome.reason or "")
    assert services.ledger.totals(image.job_id).spent == Decimal(0)


def test_budget_refusal_is_permanent(services: Services) -> None:
    image = spec()
    services.ledger.open(image.job_id, Decimal("0.001"))
    outcome = made(ImagePipeline(services).run(image, attempt=0))
    assert not outcome.ok
    assert "Budget exceeded" in (outcome.reason or "")
    assert CountingGenerator.calls == 0


def test_an_image_paid_for_and_stored_is_reused_not_made_again(services: Services) -> None:
    """A delivery died after the upload, before recording: the next one reuses the file."""
    image = spec()
    services.ledger.open(image.job_id, None)
    services.ledger.charge(
        image.job_id, image.key, "attempt-0", Decimal("0.005"), made_note=MadeImage(1.25).note()
    )
    services.store.put_png(image.storage_path, b"\x89PNG stored")
    outcome = made(ImagePipeline(services).run(image, attempt=0))
    assert outcome.ok
    assert (outcome.generation_time, outcome.cost) == (1.25, Decimal("0.005"))
    assert CountingGenerator.calls == 0
    assert services.ledger.totals(image.job_id).spent == Decimal("0.005")


def test_a_paid_image_missing_from_the_store_is_made_again_and_charged_once(
    services: Services,
) -> None:
    image = spec()
    services.ledger.open(image.job_id, None)
    services.ledger.charge(
        image.job_id, image.key, "attempt-0", Decimal("0.005"), made_note=MadeImage(1.0).note()
    )
    outcome = made(ImagePipeline(services).run(image, attempt=0))
    assert outcome.ok
    # Interrupted before its upload: made once more (a remote generator resumes the same
    # prediction instead), and the same paid call is charged once.
    assert CountingGenerator.calls == 1
    assert services.ledger.totals(image.job_id).spent == Decimal("0.005")


def test_deliveries_of_one_image_at_once_make_it_once(services: Services, redis_client) -> None:
    """Three deliveries of one image at once: one makes it; each other one either returns its
    outcome or, while it is being made, steps aside; looking again then returns the outcome."""
    import threading

    slow = Services.build(
        services.settings,
        client=redis_client,
        store=services.store,
        generator=CountingGenerator(latency_s=0.5),
    )
    image = spec()
    slow.ledger.open(image.job_id, None)
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(ImagePipeline(slow).run(image, 0)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert CountingGenerator.calls == 1
    later = [
        ImagePipeline(slow).run(image, 0) if isinstance(r, HeldElsewhere) else r for r in results
    ]
    assert len({made(r).image_url for r in later}) == 1
    assert [r.is_new for r in later].count(True) == 1  # the others found its outcome
    assert slow.ledger.totals(image.job_id).spent == Decimal("0.005")


def test_a_copy_finding_the_image_held_steps_aside_at_once(
    services: Services, redis_client
) -> None:
    """A copy of an image's task (a re-send) meets the delivery that is making the image: it
    records and pays nothing and holds no slot waiting (issue 20, item 8); it is told to look
    again when the holder's lock would expire were the holder dead, and then, the holder
    gone without an outcome, it makes the image itself."""
    image = spec()
    services.ledger.open(image.job_id, None)
    listener = events(redis_client, image.job_id)
    other = services.locks.try_acquire(c.JobKeys(image.job_id).image_lock(image.key))
    assert other is not None

    step = ImagePipeline(services).run(image, attempt=0)

    assert isinstance(step, HeldElsewhere), step
    assert 0 < step.check_in_s <= services.locks.ttl_s + 0.5
    assert CountingGenerator.calls == 0 and drain(listener) == []
    assert services.ledger.totals(image.job_id).spent == Decimal(0)
    assert services.jobs.stored_outcome(image.job_id, image.key) is None

    # The holder died: its lock lapses (deleted here, as its expiry would) with no outcome.
    redis_client.delete(str(other.name))
    services.holdings.drop_lock(other)
    outcome = made(ImagePipeline(services).run(image, attempt=0))
    assert outcome.ok and CountingGenerator.calls == 1
