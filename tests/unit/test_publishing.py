"""Publishing through a broker that is gone for a moment (issue 20, item 3)."""

from __future__ import annotations

import inspect

import pytest
from celery.app.amqp import AMQP
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from tasks import publishing
from tasks.app import app
from tasks.recovery import ABANDONING
from worker import crashpoints


def test_the_fail_switch_raises_what_a_publish_with_the_broker_gone_raises(monkeypatch) -> None:
    monkeypatch.setattr(crashpoints, "_FAIL_AT", "publish.start_chord")
    monkeypatch.setattr(crashpoints, "_FUSE", None)
    with pytest.raises(OperationalError):
        crashpoints.fail_point("publish.start_chord", error=OperationalError)
    # ... and a delivery that meets it keeps its lease rather than failing.
    assert issubclass(OperationalError, ABANDONING)


def test_a_publish_is_tried_again_while_the_broker_is_away(monkeypatch) -> None:
    monkeypatch.setattr(publishing.tenacity.nap, "sleep", lambda _: None)
    failures = [OperationalError("refused"), Reject(OperationalError("refused"), requeue=False)]

    def send() -> str:
        if failures:
            raise failures.pop(0)
        return "sent"

    assert publishing.publish("publish.start_chord", send) == "sent"
    assert failures == []


def test_a_publish_gives_up_with_the_publish_error_and_other_errors_at_once(monkeypatch) -> None:
    monkeypatch.setattr(publishing, "PUBLISH_FOR_S", 0.0)
    monkeypatch.setattr(publishing.tenacity.nap, "sleep", lambda _: None)
    calls: list[int] = []

    def refused() -> None:
        calls.append(1)
        raise Reject(OperationalError("refused"), requeue=False)

    with pytest.raises(OperationalError):  # not Reject: the delivery keeps its lease
        publishing.publish("publish.image_retry", refused)

    def bug() -> None:
        calls.append(2)
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        publishing.publish("publish.image_retry", bug)
    assert calls.count(2) == 1


def test_the_chord_callback_is_published_through_our_retries() -> None:
    """Celery's Redis backend sends a chord's callback through ``AMQP._retry_publish``; if
    an upgrade renames it, this fails rather than the callback silently losing its retries."""
    assert isinstance(app.amqp, publishing.RetriedCallbackAMQP)
    assert "_retry_publish" in vars(AMQP)
    assert list(inspect.signature(vars(AMQP)["_retry_publish"]).parameters)[:2] == [
        "self",
        "publish",
    ]
