"""The backlog gauges read the broker as kombu writes it: messages published by kombu itself
(priorities on, as the worker configures them) to a real redis-server, some of them taken and
held unacknowledged."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection, Exchange, Queue
from kombu.transport.redis import Channel

from worker import constants as c
from worker.backlog import FIRST_SEEN, BacklogCollector, priority_lists, read_backlog
from worker.scripts import register

PRIORITIES = {"broker_transport_options": {"priority_steps": list(c.PRIORITY_LEVELS)}}


@pytest.fixture
def queues() -> list[str]:
    return [f"q-{uuid.uuid4().hex[:6]}", f"q-{uuid.uuid4().hex[:6]}"]


@pytest.fixture
def connection(redis_server) -> Iterator[Connection]:
    with Connection(
        redis_server.url, transport_options=PRIORITIES["broker_transport_options"]
    ) as conn:
        yield conn


def publish(connection: Connection, queue: str, priority: int, **headers: object) -> None:
    target = Queue(queue, Exchange(queue), routing_key=queue, max_priority=9)
    with connection.Producer() as producer:
        producer.publish(
            {"n": 1},
            exchange=target.exchange,
            routing_key=queue,
            declare=[target],
            priority=priority,
            headers=headers,
            serializer="json",
        )


def test_the_names_are_kombus() -> None:
    assert Channel.sep == c.KOMBU_PRIORITY_SEP
    assert Channel.unacked_key == c.KOMBU_UNACKED


def test_every_priority_list_counts_and_held_messages_count_apart(
    connection, redis_client, queues
) -> None:
    first, second = queues
    levels = [0, 3, 3, 5, 9]
    for level in levels:
        publish(connection, first, level)
    publish(connection, second, 1)
    # kombu put them in the lists the gauges read, one per level used.
    used = [name for name in priority_lists(first) if redis_client.llen(name)]
    assert used == [priority_lists(first)[level] for level in (0, 3, 5, 9)]

    consumer_side = connection.clone()
    held = consumer_side.SimpleQueue(first)
    taken = [held.get(timeout=5) for _ in range(2)]  # taken, not acknowledged
    first_seen = register(redis_client, "backlog_first_seen")
    backlog = read_backlog(redis_client, queues, first_seen)
    assert backlog.queues[first].waiting == len(levels) - 2
    assert backlog.queues[first].unacked == 2
    assert backlog.queues[second].waiting == 1 and backlog.queues[second].unacked == 0
    # The highest priority first: 0, then 3.
    assert [m.properties["priority"] for m in taken] == [0, 3]

    for message in taken:
        message.ack()
    after = read_backlog(redis_client, queues, first_seen)
    assert (after.queues[first].waiting, after.queues[first].unacked) == (3, 0)
    held.close()
    consumer_side.close()


def test_the_oldest_age_is_the_send_time_a_message_carries(
    connection, redis_client, queues
) -> None:
    first, second = queues
    now = time.time()
    publish(connection, first, 5, **{c.SENT_AT_HEADER: now - 300})
    publish(connection, first, 0, **{c.SENT_AT_HEADER: now - 30})
    publish(connection, second, 0, **{c.SENT_AT_HEADER: now - 30})
    backlog = read_backlog(redis_client, queues, register(redis_client, "backlog_first_seen"))
    # The oldest of the queue's lists, whatever its priority.
    assert backlog.queues[first].oldest_age_s >= 300 > backlog.queues[second].oldest_age_s >= 30


def test_a_message_without_a_send_time_ages_from_when_it_was_first_seen(
    connection, redis_client, queues
) -> None:
    first, _ = queues
    publish(connection, first, 0)  # what a bare Celery client sends: no stamp
    first_seen = register(redis_client, "backlog_first_seen")
    ages = [read_backlog(redis_client, queues, first_seen).queues[first].oldest_age_s]
    time.sleep(0.2)
    ages.append(read_backlog(redis_client, queues, first_seen).queues[first].oldest_age_s)
    assert ages[0] < ages[1]
    assert redis_client.hlen(FIRST_SEEN) >= 1

    with connection.clone() as consumer_side:
        message = consumer_side.SimpleQueue(first).get(timeout=5)
        message.ack()
        empty = read_backlog(redis_client, queues, first_seen).queues[first]
    assert (empty.waiting, empty.oldest_age_s) == (0, 0.0)
    tag = message.properties["delivery_tag"]
    assert not redis_client.hexists(FIRST_SEEN, tag)  # forgotten once it left the head


def test_the_collector_names_its_gauges(connection, redis_client, queues) -> None:
    publish(connection, queues[0], 2, **{c.SENT_AT_HEADER: time.time()})
    families = {f.name: f for f in BacklogCollector(redis_client, queues).collect()}
    assert set(families) == {
        "refgen_queue_messages_waiting",
        "refgen_queue_messages_unacked",
        "refgen_queue_oldest_message_age_seconds",
    }
    waiting = {
        s.labels["queue"]: s.value for s in families["refgen_queue_messages_waiting"].samples
    }
    assert waiting == {queues[0]: 1, queues[1]: 0}
