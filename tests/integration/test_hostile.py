"""Hostile input sent by name to a real worker: each case ends within seconds with a clear
error event or a sane result, nothing escapes the job's storage prefix, and the worker keeps
serving. Messages that are not JSON are refused, never unpickled."""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import pytest
import redis
from kombu import Connection, Producer

from tests.hostile import Case, cases, fresh
from worker import constants as c

pytestmark = pytest.mark.integration
CASES = cases()


class Tripwire:
    """Unpickling this creates a file: proof that the worker deserialized pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_plan_sent_by_name(case: Case, worker, run_job, redis_server, storage_dir) -> None:
    job_id, plan = fresh(case)
    run = run_job(
        plan,
        duration_seconds=case.duration_seconds,
        job_id=str(job_id),
        timeout_s=10 if case.refused else 30,
    )
    if case.refused:
        assert run.result is None
        assert run.types == ["error", "stage_update"]
        error = run.events[0][1]
        assert error["reason"] and "Traceback" not in error["reason"]
        assert run.events[1][1]["status"] == "failed"
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        # Nothing queued, generated or charged for a refused plan.
        assert not client.exists(f"refgen:job:{{{job_id}}}:meta")
        assert not client.hgetall(f"refgen:job:{{{job_id}}}:charges")
    else:
        assert run.result is not None and run.result["status"] == "success"
    bucket = storage_dir / "reference-images"
    for path in bucket.rglob("*"):
        assert path.resolve().is_relative_to(bucket.resolve())
        if path.is_file() and not path.name.startswith("."):
            uuid.UUID(path.parent.name)  # every file sits under a real job id
    assert worker.alive


def test_messages_that_are_not_json_are_refused(
    worker, run_job, redis_server, load_plan, tmp_path
) -> None:
    tripwire = tmp_path / "unpickled"
    with Connection(redis_server.url) as connection:
        producer = Producer(connection)
        headers = {
            "task": "reference_generator.start",
            "id": str(uuid.uuid4()),
            "lang": "py",
            "argsrepr": "",
            "kwargsrepr": "",
        }
        producer.publish(
            pickle.dumps(((), {"plan": Tripwire(tripwire)}, {})),
            routing_key="reference_generator",
            headers=headers,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            serializer=None,
        )
        producer.publish(
            b"{not json at all",
            routing_key="reference_generator",
            headers={**headers, "id": str(uuid.uuid4())},
            content_type="application/json",
            content_encoding="utf-8",
            serializer=None,
        )
    # The worker takes the next job as if nothing happened...
    assert run_job(load_plan("minimal_1x1")).result["status"] == "success"
    # ...and never ran the pickle.
    assert not tripwire.exists()
    assert worker.alive
    log = Path(worker.log_path).read_text()
    assert "pickle" in log.lower() or "refus" in log.lower()


def test_images_sent_by_name_outside_an_admitted_plan_are_refused_before_paying(
    worker, client, run_job, redis_server, storage_dir, load_plan
) -> None:
    """Whoever can write to the broker can send generate_reference directly, skipping start's
    validation and budget: an image is made only as its admitted job planned it."""
    plan = load_plan("minimal_1x1")
    admitted = run_job(plan)
    assert admitted.result["status"] == "success"
    meta = redis.Redis.from_url(redis_server.url, decode_responses=True).hget(
        f"refgen:job:{{{plan['job_id']}}}:meta", "images"
    )
    planned = json.loads(meta)[0]
    logged_before = len(Path(worker.log_path).read_text())
    stranger = str(uuid.uuid4())
    forged = {
        "never admitted": {**planned, "job_id": stranger},
        "not in the plan": {**planned, "image_id": "vault", "prompt": "x"},
        "another prompt": {**planned, "prompt": "something expensive", "seed": 1},
    }
    for what, spec in forged.items():
        sent = client.send_task(c.TASK_GENERATE, kwargs={"spec": spec}, queue="reference_generator")
        sent.get(timeout=30, propagate=False)
        assert sent.state == "FAILURE", what
        assert "Refused" in str(sent.result) and "nothing was paid" in str(sent.result), what
    store = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert not store.exists(f"refgen:job:{{{stranger}}}:charges")
    assert not (storage_dir / "reference-images" / stranger).exists()
    # The admitted job's record is unchanged: still one charge per planned image.
    charges = store.hgetall(f"refgen:job:{{{plan['job_id']}}}:charges")
    assert len(charges) == len(admitted.result["scene_references"]) + len(
        admitted.result["character_references"]
    )
    log = Path(worker.log_path).read_text()[logged_before:]  # the worker is the session's
    assert log.count("image_refused") == 3 and "Traceback" not in log
    assert worker.alive


def test_an_image_message_that_names_no_image_is_refused_in_one_line(worker, client) -> None:
    """Sent by name with arguments that are not an image spec (none, too many, a spec
    missing its fields): a refused FAILURE like a forged image's, one log line, no traceback."""
    logged_before = len(Path(worker.log_path).read_text())
    malformed = {
        "no spec": ([], {}),
        "not a spec": ([], {"spec": "an image, please"}),
        "a spec missing its fields": ([], {"spec": {"job_id": str(uuid.uuid4())}}),
        "too many arguments": ([{"job_id": "x"}, 2, 3], {}),
        "unexpected keywords": ([], {"spec": {}, "pay": "twice"}),
    }
    for what, (args, kwargs) in malformed.items():
        sent = client.send_task(
            c.TASK_GENERATE, args=args, kwargs=kwargs, queue="reference_generator"
        )
        sent.get(timeout=30, propagate=False)
        assert sent.state == "FAILURE", what
        assert "Refused" in str(sent.result) and "nothing was paid" in str(sent.result), what
    log = Path(worker.log_path).read_text()[logged_before:]
    assert log.count("image_refused") == len(malformed) and "Traceback" not in log
    assert worker.alive
