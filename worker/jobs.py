"""Job bookkeeping in Redis: who claimed a job, what each image came to, the final result.

This is what makes tasks idempotent: an outcome stored for (job, image) is returned again
instead of paying for the image twice, and a job is claimed and finalized once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from worker import constants as c
from worker.generation import PredictionRef
from worker.models import ImageOutcome


@dataclass(frozen=True)
class JobMeta:
    total_images: int
    started_at: float


@dataclass(frozen=True)
class OutcomeCounts:
    finished: int
    succeeded: int


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int = c.JOB_STATE_TTL_S) -> None:
        self._redis = client
        self._ttl = ttl_s

    def claim(self, job_id: str, task_id: str) -> bool:
        """First ``start`` for a job id wins; a second enqueue of the same job is a no-op."""
        return bool(self._redis.set(c.JobKeys(job_id).claim, task_id, nx=True, ex=self._ttl))

    def claimed_by(self, job_id: str) -> str | None:
        return _text(self._redis.get(c.JobKeys(job_id).claim))

    def release_claim(self, job_id: str) -> None:
        self._redis.delete(c.JobKeys(job_id).claim)

    def begin(self, job_id: str, total_images: int) -> None:
        keys = c.JobKeys(job_id)
        pipe = self._redis.pipeline()
        pipe.hsetnx(keys.meta, "total_images", total_images)
        pipe.hsetnx(keys.meta, "started_at", time.time())
        pipe.expire(keys.meta, self._ttl)
        pipe.execute()

    def meta(self, job_id: str) -> JobMeta | None:
        raw = self._redis.hgetall(c.JobKeys(job_id).meta)
        if not raw:
            return None
        return JobMeta(total_images=int(raw["total_images"]), started_at=float(raw["started_at"]))

    def stored_outcome(self, job_id: str, image_key: str) -> ImageOutcome | None:
        raw = self._redis.hget(c.JobKeys(job_id).images, image_key)
        return ImageOutcome.model_validate_json(raw) if raw else None

    def record_outcome(
        self, job_id: str, image_key: str, outcome: ImageOutcome
    ) -> tuple[ImageOutcome, OutcomeCounts, bool]:
        """Store an image's final outcome unless one is stored already. Returns the one on
        record, the job's running counts, and whether this call stored it."""
        keys = c.JobKeys(job_id)
        pipe = self._redis.pipeline()  # MULTI/EXEC: the counts match the write
        pipe.hsetnx(keys.images, image_key, outcome.model_dump_json())
        pipe.hget(keys.images, image_key)
        pipe.hvals(keys.images)
        pipe.expire(keys.images, self._ttl)
        is_new, stored, all_outcomes, _ = pipe.execute()
        outcomes = [ImageOutcome.model_validate_json(v) for v in all_outcomes]
        counts = OutcomeCounts(finished=len(outcomes), succeeded=sum(1 for o in outcomes if o.ok))
        return ImageOutcome.model_validate_json(stored), counts, bool(is_new)

    def outcomes(self, job_id: str) -> dict[str, ImageOutcome]:
        raw = self._redis.hgetall(c.JobKeys(job_id).images)
        return {str(k): ImageOutcome.model_validate_json(v) for k, v in raw.items()}

    def saved_prediction(self, job_id: str, image_key: str) -> PredictionRef | None:
        raw = _text(self._redis.hget(c.JobKeys(job_id).predictions, image_key))
        if raw is None:
            return None
        prediction_id, created_at = raw.split(" ", 1)
        return PredictionRef(prediction_id, float(created_at))

    def save_prediction(self, job_id: str, image_key: str, ref: PredictionRef) -> None:
        key = c.JobKeys(job_id).predictions
        pipe = self._redis.pipeline()
        pipe.hset(key, image_key, f"{ref.id} {ref.created_at}")
        pipe.expire(key, self._ttl)
        pipe.execute()

    def mark_finalized(self, job_id: str) -> bool:
        """True for the one caller that finalizes the job."""
        return bool(self._redis.set(c.JobKeys(job_id).finalized, "1", nx=True, ex=self._ttl))

    def save_result(self, job_id: str, result_json: str) -> None:
        self._redis.set(c.JobKeys(job_id).result, result_json, ex=self._ttl)

    def saved_result(self, job_id: str) -> str | None:
        return _text(self._redis.get(c.JobKeys(job_id).result))


def _text(value: object) -> str | None:
    # The client is built with decode_responses=True; this narrows redis-py's wide types.
    return None if value is None else str(value)
