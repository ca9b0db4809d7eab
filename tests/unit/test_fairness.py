"""Which waiting task a free slot takes next (worker/fairness.py), and the broker behaviour it
rests on: kombu's Redis transport serves priority 0 first, and a message sent without one
(an upstream ``start``) counts as 0."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.transport.redis import PRIORITY_STEPS as KOMBU_DEFAULT_STEPS
from pydantic import ValidationError

from tasks.localredis import RedisServer
from worker import constants as c
from worker.fairness import image_priority
from worker.settings import Settings


@pytest.mark.parametrize(
    ("images", "level"),
    [(1, 1), (2, 2), (3, 3), (4, 3), (5, 4), (8, 4), (9, 5), (16, 5), (17, 6), (48, 7), (50, 7)],
)
def test_images_go_by_their_jobs_size_class(images: int, level: int) -> None:
    assert image_priority(images) == level


def test_no_image_goes_at_the_top_and_none_past_the_lowest_level() -> None:
    levels = [image_priority(n) for n in range(1, 10_001)]
    assert min(levels) == c.PRIORITY_TOP + 1
    assert max(levels) == c.PRIORITY_LOWEST
    assert levels == sorted(levels)  # a larger job never goes before a smaller one


def test_the_worker_consumes_every_list_a_default_client_writes() -> None:
    import celeryconfig

    steps = celeryconfig.broker_transport_options["priority_steps"]
    assert steps == list(c.PRIORITY_LEVELS)
    assert set(KOMBU_DEFAULT_STEPS) <= set(steps)


def test_fairness_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REFERENCE_GEN_FAIRNESS", raising=False)
    assert Settings().reference_gen_fairness is True
    monkeypatch.setenv("REFERENCE_GEN_FAIRNESS", "false")
    assert Settings().reference_gen_fairness is False
    monkeypatch.setenv("REFERENCE_GEN_FAIRNESS", "sometimes")
    with pytest.raises(ValidationError, match="reference_gen_fairness"):
        Settings()


def test_the_redis_transport_serves_priority_zero_first(redis_server: RedisServer) -> None:
    """Through the worker's transport and its ``priority_steps``, over ``BRPOP`` as a worker
    consumes: by priority, 0 first, then first in first out; no priority is 0."""
    import celeryconfig

    name = f"fairness-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    sent: list[tuple[str, int | None]] = [
        ("image-7", 7),
        ("start-unprioritized", None),
        ("image-2a", 2),
        ("retry-0", 0),
        ("image-9", 9),
        ("image-2b", 2),
    ]
    received: list[str] = []
    with Connection(
        redis_server.url,
        transport=celeryconfig.broker_transport,
        transport_options=celeryconfig.broker_transport_options,
    ) as connection:
        producer = Producer(connection)
        for body, priority in sent:
            options: dict[str, Any] = {} if priority is None else {"priority": priority}
            producer.publish(
                body, exchange=queue.exchange, routing_key=name, declare=[queue], **options
            )

        def on_message(body: str, message: Any) -> None:
            received.append(body)
            message.ack()

        with Consumer(connection, [queue], callbacks=[on_message], prefetch_count=1):
            while len(received) < len(sent):
                connection.drain_events(timeout=5)
    assert received == [
        "start-unprioritized",
        "retry-0",
        "image-2a",
        "image-2b",
        "image-7",
        "image-9",
    ]


def test_a_starved_level_rises_until_it_is_served_before_the_stream(
    redis_server: RedisServer,
) -> None:
    """Issue 20, item 10: a large job's images (level 7) under a stream of 2-image jobs (level
    2) rise a level each time their next image has waited a period at its head, up to level 1
    and never into level 0; then they are served before the stream, in their order."""
    import time

    import redis

    import celeryconfig
    from worker.fairness import QueueAging

    name = f"aging-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    aging = QueueAging(client, [name], period_s=0.1)
    received: list[str] = []
    with Connection(
        redis_server.url,
        transport=celeryconfig.broker_transport,
        transport_options=celeryconfig.broker_transport_options,
    ) as connection:
        producer = Producer(connection)

        def send(body: str, priority: int) -> None:
            producer.publish(
                body,
                exchange=queue.exchange,
                routing_key=name,
                declare=[queue],
                priority=priority,
            )

        for body in ("big-1", "big-2", "big-3"):
            send(body, 7)
        send("retry", 0)
        level_one = f"{name}{c.KOMBU_PRIORITY_SEP}1"
        for _ in range(100):  # six levels to climb, a period at each
            aging.patrol()
            if client.llen(level_one) == 3:
                break
            time.sleep(0.05)
        assert client.llen(level_one) == 3 and client.llen(name) == 1  # level 0: the retry only
        for body in ("small-1", "small-2"):
            send(body, 2)

        def on_message(body: str, message: Any) -> None:
            received.append(body)
            message.ack()

        with Consumer(connection, [queue], callbacks=[on_message], prefetch_count=1):
            while len(received) < 6:
                connection.drain_events(timeout=5)
    assert received == ["retry", "big-1", "big-2", "big-3", "small-1", "small-2"]
