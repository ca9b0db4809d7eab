"""Prediction checkpoints in a real redis-server: intents, ids, attempts, cancellation."""

from __future__ import annotations

import uuid

import pytest

from worker import constants as c
from worker.generation.checkpoints import RedisPredictionCheckpoints


@pytest.fixture
def store(redis_client) -> RedisPredictionCheckpoints:
    return RedisPredictionCheckpoints(redis_client, ttl_s=600)


def redis_now(client) -> float:
    seconds, micros = client.time()
    return float(seconds + micros / 1_000_000)


@pytest.fixture
def job_id() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


def test_an_intent_then_its_id_per_attempt(store, job_id, redis_client) -> None:
    assert store.load(job_id) == []
    before = redis_now(redis_client)
    intent = store.save_intent(job_id, "scene_street", 0)
    assert intent is not None
    # On the Redis server's clock (to its microsecond: the script writes it as text).
    assert before - 1e-6 <= intent.intent_at <= redis_now(redis_client) + 1e-6
    # An intent written 100 s ago (by the Redis clock): its age is read on that clock too.
    written = intent.intent_at - 100
    redis_client.hset(c.JobKeys(job_id).predictions, "scene_street#0:intent", repr(written))
    before = redis_now(redis_client)
    (loaded,) = store.load(job_id)
    after = redis_now(redis_client)
    assert (loaded.image_key, loaded.attempt, loaded.prediction_id) == ("scene_street", 0, None)
    assert before - written <= loaded.age_s <= after - written
    store.save_prediction(job_id, "scene_street", 0, "p0")
    store.save_intent(job_id, "scene_street", 1)
    store.save_intent(job_id, "character_hero", 0)
    found = {(cp.image_key, cp.attempt): cp.prediction_id for cp in store.load(job_id)}
    assert found == {
        ("scene_street", 0): "p0",
        ("scene_street", 1): None,
        ("character_hero", 0): None,
    }


def test_a_new_intent_for_the_same_attempt_forgets_the_old_id(store, job_id) -> None:
    store.save_intent(job_id, "scene_street", 0)
    store.save_prediction(job_id, "scene_street", 0, "p0")
    store.save_intent(job_id, "scene_street", 0)
    assert [cp.prediction_id for cp in store.load(job_id)] == [None]


def test_a_cancelled_job_takes_no_new_intent(store, job_id) -> None:
    store.save_intent(job_id, "scene_street", 0)
    store.mark_cancelled(job_id)
    assert store.save_intent(job_id, "scene_rooftop", 0) is None
    assert [cp.image_key for cp in store.load(job_id)] == ["scene_street"]


def test_every_write_leaves_the_key_expiring(store, job_id, redis_client) -> None:
    key = c.JobKeys(job_id).predictions
    for write in (
        lambda: store.save_intent(job_id, "scene_street", 0),
        lambda: store.save_prediction(job_id, "scene_street", 0, "p0"),
        lambda: store.mark_cancelled(job_id),
    ):
        redis_client.persist(key)
        write()
        assert 0 < redis_client.ttl(key) <= 600
