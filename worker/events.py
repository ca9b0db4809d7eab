"""Progress events on ``job_events:{job_id}`` (SPEC §7), one pydantic model per payload."""

from __future__ import annotations

import json
from typing import ClassVar, Literal

import redis
import structlog
from pydantic import BaseModel, ConfigDict

from worker import constants as c
from worker.job_index import JobIndex
from worker.models import ImageType, Money

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
    status: Literal["completed", "failed"]
    total_images: int
    successful_images: int
    failed_images: int
    total_cost: Money
    total_time: float
    result_status: Literal["success", "partial", "text_only", "invalid", "refused"]


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


# Every event leaves Redis through this Lua function: appended to the job's stream and
# published on its channel in one atomic step, so the replayed order is the live order. Each
# message carries one clock, the server's: ``published_at`` (unix seconds, microseconds) is
# appended to the envelope as text, which keeps full precision (cjson would round it).
ANNOUNCE_LUA = f"""
local function announce(stream, channel, message)
  local now = redis.call('TIME')
  local stamped = string.sub(message, 1, -2) .. ',"published_at":' .. now[1] .. '.'
    .. string.format('%06d', tonumber(now[2])) .. '}}'
  redis.call('XADD', stream, 'MAXLEN', '~', {c.EVENTS_STREAM_MAXLEN}, '*', 'message', stamped)
  redis.call('EXPIRE', stream, {c.EVENTS_STREAM_TTL_S})
  redis.call('PUBLISH', channel, stamped)
  return stamped
end
"""
_PUBLISH = ANNOUNCE_LUA + "announce(KEYS[1], ARGV[1], ARGV[2])\nreturn 0\n"


class EventPublisher:
    """Publishes job events. Takes a ready-made Redis client, so tests can hand it a fake.

    With an ``index``, every ``stage_update`` (a job's start, its end, a refusal) is also
    noted in the index of recent jobs that the gateway's index page lists."""

    def __init__(self, client: redis.Redis, index: JobIndex | None = None) -> None:
        self._redis = client
        self._publish = client.register_script(_PUBLISH)
        self._index = index

    def publish(self, job_id: str, event: _Payload) -> None:
        message = encode(event)
        try:
            self._publish(keys=[c.events_stream(job_id)], args=[c.events_channel(job_id), message])
        except redis.RedisError as exc:
            # Progress is best effort: a lost event must not fail a paid image.
            log.warning("event_publish_failed", job_id=job_id, error=type(exc).__name__)
        if self._index is not None and isinstance(event, StageStarted | StageFinished):
            self._index.note_stage(job_id, event.model_dump(mode="json"))
