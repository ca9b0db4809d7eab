"""Job bookkeeping in Redis: who claimed a job, its plan, what each image came to, the result.

This is what makes tasks idempotent: an outcome recorded for (job, image) is returned again
instead of paying for the image twice; a job is claimed once and its result committed once.
The steps that must not be torn apart by a crash are one Lua script each (``worker/lua/``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis

from worker import constants as c
from worker.models import ImageOutcome, ImageSpec
from worker.replication import Replication
from worker.scripts import register

# Why a job stops paying: it can no longer pass the partial-success rule (every scene failed,
# every character, or too many images), or it was cancelled (worker/cancel.py).
DoomReason = Literal["scenes", "characters", "half", "cancelled"]
_DOOM_REASONS = ("scenes", "characters", "half", "cancelled")


def _doom(value: object) -> DoomReason | None:
    return value if value in _DOOM_REASONS else None  # type: ignore[return-value]


@dataclass(frozen=True)
class JobMeta:
    total_images: int
    started_at: float
    images: list[ImageSpec]
    launched: bool
    doomed: DoomReason | None


@dataclass(frozen=True)
class JobClosing:
    """The job as a finalize finds it."""

    committed: tuple[Any] | None  # as ``JobStore.committed_result``
    meta: JobMeta | None
    outcomes: dict[str, ImageOutcome]


def _outcomes(raw: dict[Any, Any]) -> dict[str, ImageOutcome]:
    return {str(k): ImageOutcome.model_validate_json(v) for k, v in raw.items()}


def _meta(raw: dict[Any, Any]) -> JobMeta | None:
    if not raw or "total_images" not in raw:
        return None
    return JobMeta(
        total_images=int(raw["total_images"]),
        started_at=float(raw["started_at"]),
        images=[ImageSpec.model_validate(i) for i in json.loads(raw.get("images", "[]"))],
        launched=raw.get("launched") == "1",
        doomed=_doom(raw.get("doomed")),
    )


@dataclass(frozen=True)
class MadeImage:
    """An image generated and paid for, noted with its charge (before its upload), so that a
    redelivered task can tell an image that reached the store from one that did not."""

    generation_time: float

    def note(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class ImageState:
    """What a delivery needs to know before it works on an image, read in one round trip."""

    outcome: ImageOutcome | None
    doomed: DoomReason | None
    made: MadeImage | None


@dataclass(frozen=True)
class Recorded:
    outcome: ImageOutcome
    is_new: bool
    # Set on the one outcome that left the job unable to pass the partial-success rule.
    doomed_now: DoomReason | None = None
    # Set on the outcome that completed the job: its task ends the job at once (issue 23).
    last: bool = False


@dataclass(frozen=True)
class Commit:
    """What a finalize commits once, with the final event, retention and metrics."""

    result_json: str
    final_event: str
    keep_s: int
    outcome: str
    made: int
    failed: int
    cost_nano: int


class JobStore:
    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int = c.JOB_STATE_TTL_S,
        replication: Replication | None = None,
    ) -> None:
        self._redis = client
        self._ttl = ttl_s
        self._replication = replication or Replication(client)
        self._begin = register(client, "begin_job")
        self._record = register(client, "record_outcome")
        self._commit = register(client, "commit_result")

    def claim(self, job_id: str, task_id: str) -> bool:
        """First ``start`` for a job id wins; a second enqueue of the same job is a no-op."""
        return bool(self._redis.set(c.JobKeys(job_id).claim, task_id, nx=True, ex=self._ttl))

    def claimed_by(self, job_id: str) -> str | None:
        return _text(self._redis.get(c.JobKeys(job_id).claim))

    def release_claim(self, job_id: str, *marks: str) -> None:
        """Let the job id be claimed again, and delete ``marks`` (the job's keys, such as its
        announcements made once) in the same step."""
        self._redis.delete(c.JobKeys(job_id).claim, *marks)

    def begin(
        self,
        job_id: str,
        images: list[ImageSpec],
        *,
        deadline_s: float,
        started_event: str,
        by: str = "",
        stale_result_key: str | bytes | None = None,
    ) -> bool | None:
        """Record the job's plan, schedule its deadline and announce it started, once, and
        delete ``stale_result_key`` (the result backend's key for the job id, where a refused
        earlier send left its null) in the same step.
        False when a previous delivery already did (True again for the same ``by``: the call
        retried after its reply was lost); None, with nothing written, when the job was
        cancelled before it began."""
        keys = c.JobKeys(job_id)
        stale = [stale_result_key] if stale_result_key else []
        scenes = sum(1 for i in images if i.image_type == "scene")
        planned = json.dumps([i.model_dump(mode="json") for i in images])
        (began,) = self._replication.write(
            "job_plan",
            lambda pipe: self._begin(
                keys=[
                    keys.meta,
                    c.DEADLINES,
                    c.events_stream(job_id),
                    c.JOB_INDEX,
                    c.JOB_INDEX_SUMMARIES,
                    *stale,
                ],
                args=[
                    job_id,
                    len(images),
                    scenes,
                    len(images) - scenes,
                    planned,
                    self._ttl,
                    deadline_s,
                    c.events_channel(job_id),
                    started_event,
                    by,
                ],
                client=pipe,
            ),
        )
        return None if began == -1 else bool(began)

    def mark_launched(self, job_id: str) -> None:
        self._redis.hset(c.JobKeys(job_id).meta, "launched", "1")

    def meta(self, job_id: str) -> JobMeta | None:
        return _meta(self._redis.hgetall(c.JobKeys(job_id).meta))

    def closing(self, job_id: str) -> JobClosing:
        """What a finalize reads, in one round trip: it is on the path to the final event."""
        keys = c.JobKeys(job_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(keys.result)
        pipe.hgetall(keys.meta)
        pipe.hgetall(keys.images)
        result, meta, images = pipe.execute()
        return JobClosing(
            committed=(json.loads(result),) if result is not None else None,
            meta=_meta(meta),
            outcomes=_outcomes(images),
        )

    def doomed(self, job_id: str) -> DoomReason | None:
        """Also for a job cancelled before it began, which has no plan (``meta`` is None)."""
        return _doom(self._redis.hget(c.JobKeys(job_id).meta, "doomed"))

    def cancel_reason(self, job_id: str) -> str | None:
        return _text(self._redis.hget(c.JobKeys(job_id).meta, "cancel_reason"))

    def image_state(self, job_id: str, image_key: str) -> ImageState:
        keys = c.JobKeys(job_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(keys.images, image_key)
        pipe.hget(keys.meta, "doomed")
        pipe.hget(keys.made, image_key)
        outcome, doomed, made = pipe.execute()
        return ImageState(
            outcome=ImageOutcome.model_validate_json(outcome) if outcome else None,
            doomed=_doom(doomed),
            made=MadeImage(float(json.loads(made)["generation_time"])) if made else None,
        )

    def stored_outcome(self, job_id: str, image_key: str) -> ImageOutcome | None:
        raw = self._redis.hget(c.JobKeys(job_id).images, image_key)
        return ImageOutcome.model_validate_json(raw) if raw else None

    def record_outcome(
        self,
        job_id: str,
        image_key: str,
        outcome: ImageOutcome,
        *,
        announcements: Sequence[str] = (),
    ) -> Recorded:
        """Store an image's final outcome unless one is stored already, and announce it.

        One Lua script does both, so subscribers see counts in the order outcomes landed:
        ``completed_images`` and ``progress`` in the encoded events are filled in there."""
        keys = c.JobKeys(job_id)
        ((is_new, stored, doomed_now, last),) = self._replication.write(
            "outcome",
            lambda pipe: self._record(
                keys=[keys.images, keys.counts, keys.meta, c.events_stream(job_id), c.DEADLINES],
                args=[
                    image_key,
                    outcome.model_dump_json(),
                    "1" if outcome.ok else "0",
                    outcome.image_type,
                    self._ttl,
                    c.events_channel(job_id),
                    job_id,
                    c.SETTLED_JOB_GRACE_S,
                    *announcements,
                ],
                client=pipe,
            ),
        )
        return Recorded(
            ImageOutcome.model_validate_json(stored), bool(is_new), _doom(doomed_now), bool(last)
        )

    def outcomes(self, job_id: str) -> dict[str, ImageOutcome]:
        return _outcomes(self._redis.hgetall(c.JobKeys(job_id).images))

    def committed_result(self, job_id: str) -> tuple[Any] | None:
        """``(result,)`` once the job's result is committed (``result`` may be None: text-only),
        else None."""
        raw = _text(self._redis.get(c.JobKeys(job_id).result))
        return (json.loads(raw),) if raw is not None else None

    def commit(
        self, job_id: str, commit: Commit, duration_buckets: Sequence[int]
    ) -> tuple[bool, Any]:
        """Commit the job's result and its final event, once. Returns whether this call
        committed, and the committed result: this call's, or an earlier finalize's."""
        keys = c.JobKeys(job_id)
        # One per call, the same in every send of its pipeline: a send whose reply was lost
        # still says this call committed.
        request_id = uuid.uuid4().hex
        ((is_new, stored),) = self._replication.write(
            "result",
            lambda pipe: self._commit(
                keys=[
                    keys.result,
                    keys.meta,
                    c.events_stream(job_id),
                    c.RETENTION_INDEX,
                    c.METRICS,
                    c.JOB_INDEX,
                    c.JOB_INDEX_SUMMARIES,
                ],
                args=[
                    commit.result_json,
                    self._ttl,
                    c.events_channel(job_id),
                    commit.final_event,
                    job_id,
                    commit.keep_s,
                    commit.outcome,
                    commit.made,
                    commit.failed,
                    commit.cost_nano,
                    request_id,
                    *duration_buckets,
                ],
                client=pipe,
            ),
        )
        return bool(is_new), json.loads(stored)


def _text(value: object) -> str | None:
    # The client is built with decode_responses=True; this narrows redis-py's wide types.
    return None if value is None else str(value)
