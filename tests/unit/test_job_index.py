"""The index of recent jobs: written from stage events, merged per job, bounded in size and
in age. Against a real redis-server (the script uses the server's clock and cjson)."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

import redis

from worker import constants as c
from worker.events import EventPublisher, StageFinished, StageStarted
from worker.job_index import JobIndex, JobSummary


def redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds + micros / 1_000_000)


def clean(client: redis.Redis) -> None:
    client.delete(c.JOB_INDEX, c.JOB_INDEX_SUMMARIES)


def test_a_job_is_noted_when_it_starts_and_when_it_ends(redis_client: redis.Redis) -> None:
    clean(redis_client)
    index = JobIndex(redis_client)
    events = EventPublisher(redis_client, index)
    job = str(uuid.uuid4())
    before = redis_now(redis_client)
    events.publish(job, StageStarted(total_images=4))
    after = redis_now(redis_client)
    [running] = index.recent()
    assert (running.job_id, running.status, running.total_images) == (job, "running", 4)
    # Stamped on the Redis server's clock while it was published (to cjson's precision).
    assert running.started_at is not None and before - 1e-3 <= running.started_at <= after + 1e-3
    assert running.finished_at is None

    events.publish(
        job,
        StageFinished(
            status="completed",
            total_images=4,
            successful_images=3,
            failed_images=1,
            total_cost=Decimal("0.015"),
            total_time=5.5,
            result_status="partial",
        ),
    )
    [done] = index.recent()
    assert done == JobSummary(
        job_id=job,
        status="partial",
        total_images=4,
        successful_images=3,
        failed_images=1,
        total_cost="0.015",
        total_time=5.5,
        started_at=running.started_at,
        finished_at=done.finished_at,
    )
    assert done.finished_at is not None and done.finished_at >= running.started_at
    assert 0 < redis_client.ttl(c.JOB_INDEX) <= c.JOB_INDEX_TTL_S
    assert 0 < redis_client.ttl(c.JOB_INDEX_SUMMARIES) <= c.JOB_INDEX_TTL_S


def test_the_index_keeps_the_newest_jobs_up_to_its_cap(redis_client: redis.Redis) -> None:
    clean(redis_client)
    index = JobIndex(redis_client, max_entries=3)
    jobs = [f"job-{n}" for n in range(5)]
    for job in jobs:
        index.note_stage(job, {"status": "started", "total_images": 1})
        time.sleep(0.002)  # distinct first-seen times
    assert [s.job_id for s in index.recent()] == ["job-4", "job-3", "job-2"]
    assert redis_client.hlen(c.JOB_INDEX_SUMMARIES) == 3  # the dropped summaries went too
    # An end keeps a job's place: it is ordered by when it was first seen.
    index.note_stage("job-2", {"status": "completed", "result_status": "success"})
    assert [s.job_id for s in index.recent()] == ["job-4", "job-3", "job-2"]


def test_jobs_older_than_the_ttl_go(redis_client: redis.Redis) -> None:
    clean(redis_client)
    index = JobIndex(redis_client, ttl_s=1)
    index.note_stage("old", {"status": "started", "total_images": 1})
    time.sleep(1.2)
    index.note_stage("new", {"status": "started", "total_images": 1})
    assert [s.job_id for s in index.recent()] == ["new"]
    assert redis_client.hget(c.JOB_INDEX_SUMMARIES, "old") is None


def test_unreadable_summaries_are_skipped() -> None:
    assert JobSummary.parse("x", None) is None
    assert JobSummary.parse("x", "not json") is None
    assert JobSummary.parse("x", "[1]") is None
    assert JobSummary.parse("x", '{"status": "running", "total_images": "4"}') == JobSummary(
        job_id="x", status="running"
    )


def test_a_lost_redis_never_fails_the_event_that_notes_a_job() -> None:
    import fakeredis

    server = fakeredis.FakeServer()
    server.connected = False
    client = fakeredis.FakeRedis(server=server, decode_responses=True)
    EventPublisher(client, JobIndex(client)).publish("job-1", StageStarted())  # logged only


def test_a_refused_plan_whose_id_cannot_be_a_job_id_is_not_indexed(
    redis_client: redis.Redis,
) -> None:
    """A refused plan's id is whatever the sender wrote (printable, up to 256 characters): it
    gets its events, but the index of recent jobs lists only ids that can be jobs'."""
    clean(redis_client)
    index = JobIndex(redis_client)
    events = EventPublisher(redis_client, index)
    refusal = StageFinished(
        status="failed",
        total_images=0,
        successful_images=0,
        failed_images=0,
        total_cost=Decimal(0),
        total_time=0.0,
        result_status="invalid",
    )
    for bad in ("<img src=x onerror=alert(1)>", "a" * 256, "job id with spaces", "../../etc"):
        events.publish(bad, refusal)
    good = str(uuid.uuid4())
    events.publish(good, refusal)
    assert [s.job_id for s in index.recent()] == [good]
