"""Pins the one override of Celery's chord in tasks/backend.py: a header task that failed with
``ImageNotMade`` is a FAILURE, and the chord's callback still receives the outcome it carries.

Celery's own chord machinery runs here for real against a real redis-server: the chord is
sent with ``chord(header)(callback)``, and each header task is completed as a worker completes
one (``mark_as_done`` / ``mark_as_failure`` with the request its message carries), which runs
the Redis backend's ``on_chord_part_return``: the chord count in Lua, the unpacking of the parts,
the publishing of the callback. If a Celery upgrade changes how a failed part is stored or
unpacked, these tests fail.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from unittest.mock import patch

import pytest
from celery import Celery, chord, group, states
from celery.app.task import Context
from celery.exceptions import ChordError
from kombu import Connection
from kombu.simple import SimpleQueue

from tasks.backend import ImageNotMade, PollingRedisBackend


@pytest.fixture
def app(redis_server) -> Iterator[Celery]:
    queue = f"pin-{uuid.uuid4().hex[:8]}"
    app = Celery(
        "pin",
        broker=redis_server.url,
        backend=f"tasks.backend:PollingRedisBackend+{redis_server.url}",
        set_as_current=False,
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=queue,
    )

    @app.task(name="pin.image", shared=False)
    def image(n: int) -> None: ...

    @app.task(name="pin.finalize", shared=False)
    def finalize(results: list[Any]) -> None: ...

    yield app
    app.close()


def outcome(n: int, ok: bool) -> dict[str, Any]:
    return {"image_id": f"img{n}", "ok": ok, "reason": None if ok else f"image {n} broke"}


def send_chord(app: Celery, parts: int) -> tuple[str, list[Context]]:
    """Send a chord and take its header messages off the queue, as a worker would; returns
    the callback's task id and each header task's request."""
    job = str(uuid.uuid4())
    header = group(
        [app.signature("pin.image", (n,)).set(task_id=f"{job}:{n}") for n in range(parts)]
    ).set(task_id=f"{job}:images")
    chord(header)(app.signature("pin.finalize").set(task_id=job))
    requests = []
    for message in take(app, parts):
        _, _, embed = message.payload
        headers = message.headers
        requests.append(
            Context(
                id=headers["id"],
                group=headers["group"],
                group_index=headers["group_index"],
                chord=embed["chord"],
            )
        )
    assert sorted(r.id for r in requests) == [f"{job}:{n}" for n in range(parts)]
    return job, requests


def take(app: Celery, count: int) -> list[Any]:
    with Connection(app.conf.broker_url) as connection:
        queue = SimpleQueue(connection, app.conf.task_default_queue)
        messages = []
        for _ in range(count):
            message = queue.get(timeout=5)
            message.ack()
            messages.append(message)
        queue.close()
        return messages


def test_the_backend_is_ours(app: Celery) -> None:
    assert isinstance(app.backend, PollingRedisBackend)


def test_a_failed_image_is_a_failure_and_the_callback_gets_every_outcome(app: Celery) -> None:
    job, requests = send_chord(app, 3)
    backend = app.backend
    for n, request in enumerate(requests):
        if n == 1:
            failure = ImageNotMade(f"image {n} broke", outcome(n, ok=False))
            backend.mark_as_failure(request.id, failure, request=request)
        else:
            backend.mark_as_done(request.id, outcome(n, ok=True), request=request)

    (callback,) = take(app, 1)
    assert callback.headers["id"] == job
    args, _, _ = callback.payload
    assert args == [[outcome(0, True), outcome(1, False), outcome(2, True)]]
    # The failed part is stored as a FAILURE whose exception reads as its reason.
    failed = app.AsyncResult(requests[1].id)
    assert failed.state == states.FAILURE
    assert str(failed.result) == "image 1 broke"
    assert app.AsyncResult(requests[0].id).state == states.SUCCESS


def test_any_other_failure_still_fails_the_chord(app: Celery, redis_client) -> None:
    """The override is narrow: an exception that is not ImageNotMade keeps Celery's rule."""
    job, requests = send_chord(app, 2)
    app.backend.mark_as_done(requests[0].id, outcome(0, ok=True), request=requests[0])
    app.backend.mark_as_failure(requests[1].id, RuntimeError("a bug"), request=requests[1])

    meta = app.backend.get_task_meta(job)
    assert meta["status"] == states.FAILURE
    assert isinstance(meta["result"], ChordError)
    assert redis_client.llen(app.conf.task_default_queue) == 0  # no callback was sent


def test_a_chord_sets_its_size_in_one_round_trip(app: Celery, redis_client) -> None:
    backend = app.backend
    group_id = f"{uuid.uuid4()}:images"
    done, size = (
        backend.get_key_for_group(group_id, ".c"),
        backend.get_key_for_group(group_id, ".s"),
    )
    redis_client.set(done, "done")  # left by an earlier run of the same chord
    pool = backend.client.connection_pool
    with (
        patch.object(pool, "get_connection", wraps=pool.get_connection) as taken,
        patch.object(backend.client, "pipeline", wraps=backend.client.pipeline) as piped,
    ):
        backend.set_chord_size(group_id, 4)
    assert taken.call_count == 1
    assert piped.call_args.kwargs.get("transaction", True)  # MULTI: both or neither
    assert redis_client.get(done) is None  # a new run: its parts are not late duplicates
    assert redis_client.get(size) == "4"
    assert 0 < redis_client.ttl(size) <= backend.chord_expires


def test_the_exception_shows_its_reason_not_its_outcome() -> None:
    failure = ImageNotMade("Timed out after 120 s", outcome(0, ok=False))
    assert repr(failure) == "ImageNotMade('Timed out after 120 s')"
    assert str(failure) == "Timed out after 120 s"
