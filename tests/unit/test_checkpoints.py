"""Prediction checkpoints in a real redis-server: intents, ids, attempts, cancellation."""

from __future__ import annotations

import time
import uuid

import pytest

from worker import constants as c
from worker.generation.checkpoints import RedisPredictionCheckpoints


@pytest.fixture
def store(redis_client) -> RedisPredictionCheckpoints:
    return RedisPredictionCheckpoints(redis_client, ttl_s=600)


@pytest.fixture
def job_id() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


def test_an_intent_then_its_id_per_attempt(store, job_id, redis_client) -> None:
    assert store.load(job_id) == []
    intent = store.save_intent(job_id, "scene_street", 0)
    assert intent is not None
    seconds, micros = redis_client.time()
    assert abs(intent.intent_at - (seconds + micros / 1e6)) < 1  # the Redis server's clock
    time.sleep(0.2)
    (loaded,) = store.load(job_id)
    assert (loaded.image_key, loaded.attempt, loaded.prediction_id) == ("scene_street", 0, None)
    assert 0.15 < loaded.age_s < 2
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
