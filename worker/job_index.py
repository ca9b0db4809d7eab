"""An index of recent jobs, for the gateway's index page: what ran, how it ended, what it cost.

A job is noted in the same Lua call that announces its start (``begin_job.lua``) and the one
that commits its result (``commit_result.lua``); a refusal, published on its own, is noted by
``EventPublisher``. The noting itself is ``note_job`` in ``worker/lua/prelude.lua``. The index is
bounded both ways (``JOB_INDEX_MAX_ENTRIES`` jobs, none first seen longer ago than
``JOB_INDEX_TTL_S``) and is best effort: a failed note never fails a job.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from worker import constants as c
from worker.scripts import register

log = structlog.get_logger(__name__)
_JOB_ID = re.compile(c.ID_PATTERN)


@dataclass(frozen=True)
class JobSummary:
    """One row of the index. ``status`` is ``running`` until the job ends, then its
    ``result_status``: success, partial, text_only, invalid or refused."""

    job_id: str
    status: str
    total_images: int | None = None
    successful_images: int | None = None
    failed_images: int | None = None
    total_cost: str | None = None
    total_time: float | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def first_seen(self) -> float | None:
        return self.started_at or self.finished_at

    @classmethod
    def parse(cls, job_id: str, raw: str | None) -> JobSummary | None:
        """A stored summary; ``None`` for a missing or unreadable one."""
        if not raw:
            return None
        try:
            fields = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(fields, dict):
            return None
        return cls(
            job_id=job_id,
            status=str(fields.get("status") or "unknown"),
            total_images=_int(fields.get("total_images")),
            successful_images=_int(fields.get("successful_images")),
            failed_images=_int(fields.get("failed_images")),
            total_cost=None if fields.get("total_cost") is None else str(fields["total_cost"]),
            total_time=_float(fields.get("total_time")),
            started_at=_float(fields.get("started_at")),
            finished_at=_float(fields.get("finished_at")),
        )


class JobIndex:
    """Writes the index. Takes a ready-made Redis client, like every boundary class."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        max_entries: int = c.JOB_INDEX_MAX_ENTRIES,
        ttl_s: int = c.JOB_INDEX_TTL_S,
    ) -> None:
        self._redis = client
        self._max = max_entries
        self._ttl = ttl_s
        self._note = register(client, "note_job")

    def note_stage(self, job_id: str, data: dict[str, Any]) -> None:
        """Note a ``stage_update``'s data: ``started`` opens the row, the others close it. A
        refused plan's id can be anything printable: only an id that can be a job's is noted."""
        if not _JOB_ID.fullmatch(job_id):
            log.info("job_index_skipped", reason="not a job id", job_id=job_id[:80])
            return
        if data.get("status") == "started":
            fields: dict[str, Any] = {
                "status": "running",
                "total_images": data.get("total_images"),
                # A job sent again under its id (after a refusal) is running, not finished.
                "finished_at": None,
            }
            stamp = "started_at"
        else:
            fields = {
                key: data.get(key)
                for key in ("total_images", "successful_images", "failed_images", "total_time")
            }
            fields["status"] = data.get("result_status") or data.get("status")
            fields["total_cost"] = data.get("total_cost")
            stamp = "finished_at"
        try:
            self._note(
                keys=[c.JOB_INDEX, c.JOB_INDEX_SUMMARIES],
                args=[job_id, json.dumps(fields), stamp, self._max, self._ttl],
            )
        except redis.RedisError as exc:
            log.warning("job_index_note_failed", job_id=job_id, error=type(exc).__name__)

    def recent(self, limit: int = 50) -> list[JobSummary]:
        """The most recently first-seen jobs, newest first."""
        ids = [str(i) for i in self._redis.zrevrange(c.JOB_INDEX, 0, limit - 1)]
        if not ids:
            return []
        raws = self._redis.hmget(c.JOB_INDEX_SUMMARIES, ids)
        found = (
            JobSummary.parse(i, None if r is None else str(r))
            for i, r in zip(ids, raws, strict=True)
        )
        return [s for s in found if s is not None]


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
