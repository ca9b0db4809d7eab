"""What the worker reads from Replicate's answers, and the headers it sends on a create."""

from __future__ import annotations

import pytest
from replicate.prediction import Prediction

from worker.errors import RetryableError
from worker.generation.replicate_api import RemotePrediction, cancel_after_s, sync_wait_s

ABORTED = {
    "id": "gm3qorzdhgbfurvjtvhg6dckhu",
    "model": "stability-ai/sdxl",
    "version": "39ed52f2",
    "input": {"prompt": "a pier", "seed": 7},
    "logs": "",
    "output": None,
    "error": None,
    "status": "aborted",
    "created_at": "2025-10-16T16:19:34.907244Z",
    "started_at": None,
    "completed_at": "2025-10-16T16:19:36.907244Z",
    "urls": {},
    "metrics": {},
}


def test_an_aborted_prediction_is_read_where_the_client_cannot() -> None:
    with pytest.raises(ValueError, match="aborted"):  # replicate 1.0.7's own model refuses it
        Prediction(**ABORTED)
    prediction = RemotePrediction.from_json(ABORTED)
    assert (prediction.status, prediction.finished, prediction.started) == ("aborted", True, False)
    assert prediction.predict_time is None
    assert prediction.input == {"prompt": "a pier", "seed": 7}
    assert prediction.created_at is not None and prediction.created_at.tzinfo is not None


def test_billable_time_only_when_it_is_a_number() -> None:
    ran = {**ABORTED, "status": "canceled", "started_at": ABORTED["created_at"]}
    assert (
        RemotePrediction.from_json({**ran, "metrics": {"predict_time": 1.25}}).predict_time == 1.25
    )
    for odd in ({"predict_time": "soon"}, {"predict_time": -1}, None, "x"):
        assert RemotePrediction.from_json({**ran, "metrics": odd}).predict_time is None
    with pytest.raises(RetryableError):
        RemotePrediction.from_json({"detail": "not a prediction"})


def test_sync_wait_and_deadline_headers_in_whole_seconds() -> None:
    # Prefer: wait=N never outlasts the time left, and is Replicate's 1–60.
    assert [sync_wait_s(t) for t in (0.4, 1.0, 9.99, 120)] == [None, 1, 9, 60]
    # Cancel-After never falls short of the time left, nor past Replicate's 30 minutes.
    assert [cancel_after_s(t) for t in (0.4, 9.01, 120, 7200)] == [1, 10, 120, 1800]
