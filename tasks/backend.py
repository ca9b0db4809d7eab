"""The result backend of refgen's processes: Celery's Redis backend without its pub/sub
result consumer.

Celery's Redis backend is "async": every ``AsyncResult`` a process creates through
``then()`` is registered as a pending result (``AsyncBackendMixin.add_pending_result``) and
its ``celery-task-meta-*`` channel subscribed, to be resolved when a message arrives on it.
Only a process that drains the consumer while waiting on ``get()`` ever resolves them, and a
worker never does. Launching a chord registers each header task twice
(``RedisBackend.apply_chord`` builds a ``GroupResult`` whose barrier holds every result
strongly; ``group._apply_tasks`` adds a weak one), so every job left four results and four
subscribed channels in the worker for good: four channels and 5 to 8 KB a job (``bench/soak.py``
with refgen, ``bench/plain_chord.py`` with a plain Celery app).

Releasing them after the launch does not help enough: ``remove_pending_result`` cannot reach
the strong references, and an UNSUBSCRIBE whose reply is never read stays in redis-py's
``pending_unsubscribe_channels`` and in the socket (celery/celery#6963). So this backend
registers nothing and subscribes to nothing: Celery's ``SyncBackendMixin`` (what its
non-pub/sub backends use) makes ``add_pending_result`` a no-op and ``get()`` poll the result
key. Storing results, chord counting and expiry are the Redis backend's own, unchanged, but
for one round trip saved: a chord's size is set (an earlier run's end mark deleted, its size
stored) in one transaction instead of two commands. ``start`` sets it just before it sends
the job's last image, so each round trip there delays that image (issue 23).

**A failed image is a FAILURE that still reaches ``finalize``** (the one override of Celery's
chord here). Flower shows a task by the worker's events, and a task that returns is SUCCESS
there whatever it returned. So ``generate_reference`` raises ``ImageNotMade`` for an image that
could not be made: the worker stores the task as FAILURE and Flower lists it with its reason.
But Celery runs no chord callback after a header task fails (celery#1881): the Redis backend's
``on_chord_part_return`` unpacks each part's stored result with ``_unpack_chord_result``, which
raises ``ChordError`` for a failed part. Ours first hands back the outcome an ``ImageNotMade``
carries (its second argument, JSON in the part's stored exception), so ``finalize`` gets every
outcome, made or not; any other failed part raises as before. ``tests/unit/test_backend.py``
pins the stored form this reads, and the Flower and job tests the whole path, so a Celery
upgrade that changes either fails them.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.base import SyncBackendMixin
from celery.backends.redis import RedisBackend, SentinelBackend


class ImageNotMade(Exception):
    """Raised by ``generate_reference`` for an image that could not be made: the task is a
    FAILURE with ``reason`` (Flower's "exception"), and ``outcome`` (the ``ImageOutcome`` as
    JSON) still goes to ``finalize``. Expected: the worker logs it in one line, at INFO."""

    def __init__(self, reason: str, outcome: dict[str, Any]) -> None:
        super().__init__(reason, outcome)
        self.reason = reason
        self.outcome = outcome

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        # What Flower shows as the task's exception: the reason, not the whole outcome.
        return f"{type(self).__name__}({self.reason!r})"


def carried_outcome(state: str, stored: Any) -> dict[str, Any] | None:
    """The outcome in a chord part's stored result, when it is an ``ImageNotMade``: with the
    JSON serializer an exception is stored as ``{exc_type, exc_module, exc_message: args}``."""
    if state != states.FAILURE or not isinstance(stored, dict):
        return None
    if (stored.get("exc_type"), stored.get("exc_module")) != (
        ImageNotMade.__qualname__,
        ImageNotMade.__module__,
    ):
        return None
    args = stored.get("exc_message")
    if isinstance(args, list | tuple) and len(args) == 2 and isinstance(args[1], dict):
        return args[1]
    return None


class _Polling(SyncBackendMixin):  # type: ignore[misc]
    def on_task_call(self, producer: Any, task_id: str) -> None:
        # The Redis backend subscribes to a task's channel as it is sent, unless the caller
        # is a worker's pool thread; a watchdog or a client sending tasks would subscribe too.
        return None

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        # As Celery's: a chord sent again under its group id (a redelivered start) is a new
        # run, whose parts are not taken for an ended run's late duplicates; its size expires
        # with its other keys.
        def both() -> None:
            with self.client.pipeline() as pipe:
                pipe.delete(self.get_key_for_group(group_id, ".c"))
                pipe.set(
                    self.get_key_for_group(group_id, ".s"),
                    chord_size,
                    ex=self.chord_expires or None,
                )
                pipe.execute()

        self.ensure(both, ())

    def _unpack_chord_result(self, tup: Any, decode: Any, **kwargs: Any) -> Any:
        _, _, state, stored = decode(tup)
        outcome = carried_outcome(state, stored)
        if outcome is not None:
            return outcome
        return super()._unpack_chord_result(tup, decode, **kwargs)


class PollingRedisBackend(_Polling, RedisBackend):  # type: ignore[misc]
    """``result_backend = "tasks.backend:PollingRedisBackend+redis://..."``."""


class PollingSentinelBackend(_Polling, SentinelBackend):  # type: ignore[misc]
    """``result_backend = "tasks.backend:PollingSentinelBackend+sentinel://...;sentinel://..."``
    with ``result_backend_transport_options = {"master_name": ...}``."""
