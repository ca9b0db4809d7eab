"""Finalization: once per job, and at the deadline with what exists."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from worker import constants as c
from worker.generation.local import LocalImageGenerator
from worker.jobs import PlannedImage
from worker.lifecycle import JobFinalizer
from worker.models import ImageOutcome
from worker.services import Services
from worker.settings import Settings
from worker.storage.local import LocalImageStore


@pytest.fixture
def services(redis_client, tmp_path: Path) -> Services:
    return Services.build(
        Settings(generator_backend="local", storage_backend="local", job_deadline_s=30),
        client=redis_client,
        generator=LocalImageGenerator(latency_s=0),
        store=LocalImageStore(tmp_path),
    )


def made(kind: str, image_id: str) -> ImageOutcome:
    return ImageOutcome(
        image_type=kind,
        image_id=image_id,
        ok=True,
        prompt_used="p",
        image_url="file:///x.png",
        generation_time=1.0,
        cost=Decimal("0.005"),
    )


def start_job(services: Services, images: list[tuple[str, str]]) -> str:
    job_id = str(uuid.uuid4())
    services.ledger.open(job_id, None)
    services.jobs.begin(job_id, [PlannedImage(k, i, f"prompt {i}") for k, i in images])
    return job_id


def test_deadline_marks_missing_images_failed_and_applies_the_rule(services, redis_client):
    job_id = start_job(
        services, [("scene", "a"), ("scene", "b"), ("character", "c"), ("character", "d")]
    )
    for kind, image_id in (("scene", "a"), ("character", "c")):
        services.ledger.charge(job_id, f"{kind}_{image_id}", Decimal("0.005"))
        services.jobs.record_outcome(job_id, f"{kind}_{image_id}", made(kind, image_id), total=4)
    listener = redis_client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(c.events_channel(job_id))
    listener.get_message(timeout=0.2)

    result = JobFinalizer(services).finalize(job_id, deadline=True)

    assert result is not None and result["status"] == "partial"  # 2 of 4, a scene, a character
    assert result["total_cost"] == "0.01"
    missing = services.jobs.stored_outcome(job_id, "scene_b")
    assert missing is not None and not missing.ok
    assert "job deadline (30 s)" in (missing.reason or "")
    events = []
    while (m := listener.get_message(timeout=0.3)) is not None:
        events.append(json.loads(m["data"]))
    failed = [
        e["data"]["image_id"] for e in events if e["event_type"] == "reference_generation_failed"
    ]
    assert sorted(failed) == ["b", "d"]
    assert events[-1]["event_type"] == "stage_update"
    assert events[-1]["data"]["failed_images"] == 2


def test_finalize_runs_once(services) -> None:
    job_id = start_job(services, [("scene", "a"), ("character", "c")])
    outcomes = [made("scene", "a"), made("character", "c")]
    first = JobFinalizer(services).finalize(job_id, outcomes)
    second = JobFinalizer(services).finalize(job_id, deadline=True)  # e.g. a late deadline
    assert first == second
    assert first is not None and first["status"] == "success"
    assert services.deadlines.due_at(job_id) is None
