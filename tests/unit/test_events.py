from __future__ import annotations

import json
from decimal import Decimal

import fakeredis
import pydantic
import pytest

from worker import constants as c
from worker.events import (
    EventPublisher,
    ImageCompleted,
    ImageFailed,
    JobError,
    StageFinished,
    StageStarted,
    encode,
)


def test_wire_form_is_event_type_and_data() -> None:
    message = json.loads(encode(StageStarted(total_images=4)))
    assert message == {
        "event_type": "stage_update",
        "data": {"stage": "reference_generator", "status": "started", "total_images": 4},
    }


def test_costs_are_decimal_strings() -> None:
    event = ImageCompleted(
        image_type="scene",
        image_id="s",
        image_url="u",
        generation_time=0.9,
        cost=Decimal("0.0006525"),
        retry_count=0,
        completed_images=1,
        total_images=2,
    )
    assert json.loads(encode(event))["data"]["cost"] == "0.0006525"


def test_failed_event_says_it_continues() -> None:
    data = json.loads(
        encode(
            ImageFailed(
                image_type="character",
                image_id="c",
                retry_count=1,
                reason="Rate limited by Replicate",
            )
        )
    )["data"]
    assert data["will_continue"] is True and data["retry_count"] == 1


def test_error_event_carries_figures() -> None:
    data = json.loads(
        encode(
            JobError(reason="Budget exceeded", message="m", limit="0.01", estimated_cost="0.024")
        )
    )["data"]
    assert data["limit"] == "0.01" and data["stage"] == "reference_generator"


def test_payloads_refuse_unknown_fields() -> None:
    with pytest.raises(pydantic.ValidationError):
        StageFinished(
            status="completed",
            total_images=1,
            successful_images=1,
            failed_images=0,
            total_cost=Decimal(0),
            total_time=1.0,
            result_status="success",
            extra=1,
        )


def test_publisher_publishes_on_the_job_channel_with_the_servers_clock(redis_client) -> None:
    import time

    listener = redis_client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(c.events_channel("job-1"))
    listener.get_message(timeout=0.2)  # the subscribe confirmation
    before = time.time()
    EventPublisher(redis_client).publish("job-1", StageStarted())
    message = listener.get_message(timeout=1)
    assert message is not None and message["channel"] == "job_events:job-1"
    body = json.loads(message["data"])
    assert body["event_type"] == "stage_update"
    assert body["data"]["status"] == "started"
    assert before - 1 < body["published_at"] < time.time() + 1
    assert len(message["data"].split('"published_at":')[1].split(".")[1]) == 7  # µs + "}"


def test_publisher_survives_a_broken_connection() -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    client = fakeredis.FakeRedis(server=server, decode_responses=True)
    EventPublisher(client).publish("job-1", StageStarted())  # logged, not raised


def test_stream_order_is_the_live_order_under_concurrency(redis_client) -> None:
    """Publish and append are one atomic step: 8 threads publishing at once cannot make the
    replayed order differ from what a subscriber saw live."""
    import threading

    job = "job-concurrent"
    redis_client.delete(c.events_stream(job))
    listener = redis_client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(c.events_channel(job))
    listener.get_message(timeout=0.2)
    publisher = EventPublisher(redis_client)

    def burst(n: int) -> None:
        for i in range(50):
            publisher.publish(
                job,
                ImageFailed(image_type="scene", image_id=f"t{n}-{i}", retry_count=0, reason="r"),
            )

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live = []
    while (message := listener.get_message(timeout=0.5)) is not None:
        live.append(message["data"])
    replayed = [fields["message"] for _, fields in redis_client.xrange(c.events_stream(job))]
    assert len(live) == 400
    assert replayed == live


def test_a_publish_run_again_announces_its_event_once(redis_client) -> None:
    """Issue 20, item 7: a publish retried after its reply was lost (redis-py retries a
    command on a timeout) must not put the event twice in the job's history."""
    from worker.scripts import register

    job_id = "job-publish-once"
    publish = register(redis_client, "publish")
    keys = [c.events_stream(job_id), c.JobKeys(job_id).sent("request-1")]
    args = [c.events_channel(job_id), '{"event_type":"progress","data":{"progress":5}}', 600]
    assert publish(keys=keys, args=args) == 1
    assert publish(keys=keys, args=args) == 0
    assert redis_client.xlen(c.events_stream(job_id)) == 1
