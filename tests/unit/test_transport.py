"""The broker transport (tasks/transport.py) against a real redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from tasks import transport
from tasks.localredis import RedisServer

QUEUE = "settle-before-a-crash"


def wait_until(condition: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def consuming(redis_server: RedisServer) -> Iterator[tuple[Connection, list[Any]]]:
    """A connection through refgen's transport, consuming on a thread of its own as a
    worker's consumer does; what it takes, in order."""
    taken: list[Any] = []
    stop = threading.Event()
    queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
    with Connection(redis_server.url, transport="tasks.transport:Transport") as connection:
        queue(connection).declare()  # bound before anything is published to it

        def take(body: Any, message: Any) -> None:
            taken.append(body)
            message.ack()

        def consume() -> None:
            with connection.Consumer(queue, callbacks=[take]):
                while not stop.is_set():
                    try:
                        connection.drain_events(timeout=0.2)
                    except TimeoutError:
                        continue

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        try:
            yield connection, taken
        finally:
            stop.set()
            thread.join(5)
            transport._TAKING_NO_MORE.clear()  # process-wide: the next test consumes again


def test_before_a_crash_the_channel_reads_what_it_asked_for_and_asks_for_no_more(
    consuming: tuple[Connection, list[Any]], redis_client: redis.Redis
) -> None:
    connection, taken = consuming
    with connection.Producer() as producer:
        producer.publish({"n": 1}, exchange=QUEUE, routing_key=QUEUE)
        wait_until(lambda: taken == [{"n": 1}])
        wait_until(lambda: any(c._in_poll for c in transport._CHANNELS))  # a BRPOP waits
        transport._settle_before_a_crash()
        # Nothing asked of the broker is left unread: a death now loses no message.
        assert not any(c._in_poll for c in transport._CHANNELS)
        producer.publish({"n": 2}, exchange=QUEUE, routing_key=QUEUE)
        time.sleep(0.5)
    assert taken == [{"n": 1}]
    assert redis_client.llen(QUEUE) == 1  # still on its queue, for a worker that lives
