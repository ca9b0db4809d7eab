"""Retention (SPEC §5): a finished job's objects are removed 14 days after a success and
7 days after a failure, by a scheduled task.

Each finished job is put in a Redis sorted set scored by the time its objects fall due. A
sweep also removes job folders the index does not know (its Redis entry lost) once their
newest object is older than the longest retention, so nothing is kept forever by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
import structlog

from worker import constants as c
from worker.retry import storage_call
from worker.storage import ImageStore

log = structlog.get_logger(__name__)

RETENTION_INDEX = c.RETENTION_INDEX
_DAY_S = 86_400


@dataclass
class PurgeReport:
    purged_jobs: list[str] = field(default_factory=list)
    deleted_objects: int = 0


class Retention:
    def __init__(
        self, client: redis.Redis, store: ImageStore, *, success_days: int, failure_days: int
    ) -> None:
        self._redis = client
        self._store = store
        self._success_s = success_days * _DAY_S
        self._failure_s = failure_days * _DAY_S

    def keep_s(self, *, succeeded: bool) -> int:
        """How long a finished job's objects are kept. The job is indexed when its result is
        committed (``commit_result.lua``), on the Redis clock."""
        return self._success_s if succeeded else self._failure_s

    def schedule(self, job_id: str, *, succeeded: bool, finished_at: float) -> None:
        self._redis.zadd(RETENTION_INDEX, {job_id: finished_at + self.keep_s(succeeded=succeeded)})

    def purge(self, now: float | None = None) -> PurgeReport:
        now = _server_now(self._redis) if now is None else now
        report = PurgeReport()
        due = [str(j) for j in self._redis.zrangebyscore(RETENTION_INDEX, "-inf", now)]
        for job_id in due:
            report.deleted_objects += self._delete_job(job_id)
            self._redis.zrem(RETENTION_INDEX, job_id)
            report.purged_jobs.append(job_id)
        oldest_allowed = now - max(self._success_s, self._failure_s)
        for job_id in storage_call(self._store.list_job_prefixes):
            if job_id in due or self._redis.zscore(RETENTION_INDEX, job_id) is not None:
                continue
            objects = storage_call(lambda j=job_id: self._store.list_prefix(j))  # type: ignore[misc]
            if objects and max(o.updated_at.timestamp() for o in objects) < oldest_allowed:
                report.deleted_objects += self._delete_job(job_id)
                report.purged_jobs.append(job_id)
        log.info("retention_purged", jobs=len(report.purged_jobs), objects=report.deleted_objects)
        return report

    def _delete_job(self, job_id: str) -> int:
        objects = storage_call(lambda: self._store.list_prefix(job_id))
        paths = [o.path for o in objects]
        storage_call(lambda: self._store.delete(paths))
        return len(paths)


def _server_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1_000_000
