"""Progress events on ``job_events:{job_id}`` (SPEC §7), one pydantic model per payload."""

from __future__ import annotations

import json
import uuid
from typing import ClassVar, Literal

import redis
import structlog
from pydantic import BaseModel, ConfigDict

from worker import constants as c
from worker.job_index import JobIndex
from worker.models import ImageType, Money
from worker.scripts import register

log = structlog.get_logger(__name__)


class _Payload(BaseModel):
    # Extra fields are allowed only where the spec says "...figures".
    model_config = ConfigDict(extra="forbid")
    event_type: ClassVar[str]


class StageStarted(_Payload):
    event_type: ClassVar[str] = c.EVENT_STAGE_UPDATE
    stage: str = c.STAGE
    status: Literal["started"] = "started"
    total_images: int | None = None


class StageFinished(_Payload):
    event_type: ClassVar[str] = c.EVENT_STAGE_UPDATE
    stage: str = c.STAGE
    status: Literal["completed", "failed", "cancelled"]
    total_images: int
    successful_images: int
    failed_images: int
    total_cost: Money
    total_time: float
    result_status: Literal["success", "partial", "text_only", "invalid", "refused", "cancelled"]


class StageCancelled(StageFinished):
    """The end of a cancelled job (worker/cancel.py): its result is null; ``reason`` is the
    one the cancel gave."""

    status: Literal["cancelled"] = "cancelled"
    result_status: Literal["cancelled"] = "cancelled"
    reason: str


class ImageStarted(_Payload):
    event_type: ClassVar[str] = c.EVENT_IMAGE_START
    image_type: ImageType
    image_id: str
    current_image: int
    total_images: int


class ImageRetrying(_Payload):
    event_type: ClassVar[str] = c.EVENT_IMAGE_RETRY
    image_type: ImageType
    image_id: str
    retry_count: int
    max_retries: int
    reason: str
    retry_in_s: float


class ImageCompleted(_Payload):
    event_type: ClassVar[str] = c.EVENT_IMAGE_COMPLETE
    image_type: ImageType
    image_id: str
    image_url: str
    generation_time: float
    cost: Money
    retry_count: int
    completed_images: int
    total_images: int


class ImageFailed(_Payload):
    event_type: ClassVar[str] = c.EVENT_IMAGE_FAILED
    image_type: ImageType
    image_id: str
    retry_count: int
    reason: str
    will_continue: bool = True


class Progress(_Payload):
    event_type: ClassVar[str] = c.EVENT_PROGRESS
    stage: str = c.STAGE
    progress: int


class JobError(_Payload):
    model_config = ConfigDict(extra="allow")
    event_type: ClassVar[str] = c.EVENT_ERROR
    stage: str = c.STAGE
    reason: str
    message: str


Event = (
    StageStarted
    | StageFinished
    | StageCancelled
    | ImageStarted
    | ImageRetrying
    | ImageCompleted
    | ImageFailed
    | Progress
    | JobError
)


def encode(event: _Payload) -> str:
    """The wire form the SSE gateway relays: ``{"event_type": ..., "data": {...}}``."""
    return json.dumps(
        {"event_type": event.event_type, "data": event.model_dump(mode="json")},
        separators=(",", ":"),
    )


class EventPublisher:
    """Publishes job events: each is appended to the job's stream and published on its channel
    in one step (``announce`` in ``worker/lua/prelude.lua``), so the replayed order is the live
    order. Takes a ready-made Redis client, so tests can hand it a fake.

    With an ``index``, a ``stage_update`` it publishes (a refusal) is also noted in the index
    of recent jobs; a job's start and end are noted in their own Lua calls."""

    def __init__(self, client: redis.Redis, index: JobIndex | None = None) -> None:
        self._redis = client
        self._publish = register(client, "publish")
        self._index = index

    def publish(self, job_id: str, event: _Payload, *, once: str | None = None) -> None:
        """``once`` names the announcement: publishing it again within a day, as a redelivered
        message does, announces nothing (its mark, ``JobKeys.sent(once)``, may be deleted to
        allow it again). Without it, only this call's own retries are deduplicated."""
        message = encode(event)
        try:
            request = c.JobKeys(job_id).sent(once or uuid.uuid4().hex)
            keep_s = c.ANNOUNCED_ONCE_TTL_S if once else c.PUBLISH_RETRY_MARK_TTL_S
            self._publish(
                keys=[c.events_stream(job_id), request],
                args=[c.events_channel(job_id), message, keep_s],
            )
        except redis.RedisError as exc:
            # Progress is best effort: a lost event must not fail a paid image.
            log.warning("event_publish_failed", job_id=job_id, error=type(exc).__name__)
        if self._index is not None and isinstance(event, StageStarted | StageFinished):
            self._index.note_stage(job_id, event.model_dump(mode="json"))
