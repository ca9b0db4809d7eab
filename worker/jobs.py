"""Job bookkeeping in Redis: who claimed a job, what each image came to, the final result.

This is what makes tasks idempotent: an outcome stored for (job, image) is returned again
instead of paying for the image twice, and a job is claimed and finalized once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import redis

from worker import constants as c
from worker.events import ANNOUNCE_LUA
from worker.models import ImageOutcome

_RECORD_AND_ANNOUNCE = (
    ANNOUNCE_LUA
    + """
local images, succeeded_key, stream = KEYS[1], KEYS[2], KEYS[3]
local image, outcome, ok, total, ttl, channel = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]),
  tonumber(ARGV[5]), ARGV[6]
if redis.call('HSETNX', images, image, outcome) == 0 then
  return {0, redis.call('HGET', images, image)}
end
local finished = redis.call('HLEN', images)
local succeeded = tonumber(redis.call('GET', succeeded_key) or '0')
if ok == '1' then succeeded = redis.call('INCR', succeeded_key) end
redis.call('EXPIRE', images, ttl)
redis.call('EXPIRE', succeeded_key, ttl)
for i = 7, #ARGV do
  local event = cjson.decode(ARGV[i])
  if event.data.completed_images ~= nil then event.data.completed_images = succeeded end
  if event.data.progress ~= nil then
    event.data.progress = math.min(100, math.floor(finished * 100 / total))
  end
  announce(stream, channel, cjson.encode(event))
end
return {1, outcome}
"""
)


@dataclass(frozen=True)
class PlannedImage:
    image_type: str
    image_id: str
    prompt: str

    @property
    def key(self) -> str:
        return f"{self.image_type}_{self.image_id}"


@dataclass(frozen=True)
class JobMeta:
    total_images: int
    started_at: float
    images: list[PlannedImage]
    launched: bool


@dataclass(frozen=True)
class MadeImage:
    """An image generated and paid for, noted before its upload, so that a redelivered task
    can tell an image that reached the store from one that did not."""

    generation_time: float
    cost: str


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int = c.JOB_STATE_TTL_S) -> None:
        self._redis = client
        self._ttl = ttl_s
        self._record = client.register_script(_RECORD_AND_ANNOUNCE)

    def claim(self, job_id: str, task_id: str) -> bool:
        """First ``start`` for a job id wins; a second enqueue of the same job is a no-op."""
        return bool(self._redis.set(c.JobKeys(job_id).claim, task_id, nx=True, ex=self._ttl))

    def claimed_by(self, job_id: str) -> str | None:
        return _text(self._redis.get(c.JobKeys(job_id).claim))

    def release_claim(self, job_id: str) -> None:
        self._redis.delete(c.JobKeys(job_id).claim)

    def begin(self, job_id: str, images: list[PlannedImage]) -> bool:
        """Record the job's images once. False when a previous delivery already did."""
        keys = c.JobKeys(job_id)
        planned = json.dumps([asdict(i) for i in images])
        pipe = self._redis.pipeline()
        pipe.hsetnx(keys.meta, "started_at", time.time())
        pipe.hsetnx(keys.meta, "total_images", len(images))
        pipe.hsetnx(keys.meta, "images", planned)
        pipe.expire(keys.meta, self._ttl)
        first, *_ = pipe.execute()
        return bool(first)

    def mark_launched(self, job_id: str) -> None:
        self._redis.hset(c.JobKeys(job_id).meta, "launched", "1")

    def meta(self, job_id: str) -> JobMeta | None:
        raw = self._redis.hgetall(c.JobKeys(job_id).meta)
        if not raw or "total_images" not in raw:
            return None
        return JobMeta(
            total_images=int(raw["total_images"]),
            started_at=float(raw["started_at"]),
            images=[PlannedImage(**i) for i in json.loads(raw.get("images", "[]"))],
            launched=raw.get("launched") == "1",
        )

    def note_made(self, job_id: str, image_key: str, made: MadeImage) -> None:
        key = c.JobKeys(job_id).made
        pipe = self._redis.pipeline()
        pipe.hset(key, image_key, json.dumps(asdict(made)))
        pipe.expire(key, self._ttl)
        pipe.execute()

    def made(self, job_id: str, image_key: str) -> MadeImage | None:
        raw = _text(self._redis.hget(c.JobKeys(job_id).made, image_key))
        return MadeImage(**json.loads(raw)) if raw else None

    def stored_outcome(self, job_id: str, image_key: str) -> ImageOutcome | None:
        raw = self._redis.hget(c.JobKeys(job_id).images, image_key)
        return ImageOutcome.model_validate_json(raw) if raw else None

    def record_outcome(
        self,
        job_id: str,
        image_key: str,
        outcome: ImageOutcome,
        *,
        total: int,
        announcements: Sequence[str] = (),
    ) -> tuple[ImageOutcome, bool]:
        """Store an image's final outcome unless one is stored already, and announce it.

        One Lua script does both, so subscribers see counts in the order outcomes landed:
        ``completed_images`` and ``progress`` in the encoded events are filled in here.
        Returns the outcome on record and whether this call stored it."""
        keys = c.JobKeys(job_id)
        is_new, stored = self._record(
            keys=[keys.images, keys.succeeded, c.events_stream(job_id)],
            args=[
                image_key,
                outcome.model_dump_json(),
                "1" if outcome.ok else "0",
                total,
                self._ttl,
                c.events_channel(job_id),
                *announcements,
            ],
        )
        return ImageOutcome.model_validate_json(stored), bool(is_new)

    def outcomes(self, job_id: str) -> dict[str, ImageOutcome]:
        raw = self._redis.hgetall(c.JobKeys(job_id).images)
        return {str(k): ImageOutcome.model_validate_json(v) for k, v in raw.items()}

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
