"""Writes that wait for a replica: what they return, when they wait, and what a lagging
replica costs. Against the session's real redis-server, which has no replica."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from worker.replication import Replication
from worker.scripts import register


class ClaimsAReplica(redis.Redis):
    """A primary that says it has a replica which never acknowledges: one that lags."""

    def info(self, section: Any = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"connected_slaves": 1}


@pytest.fixture
def lagging(redis_server) -> Iterator[redis.Redis]:
    client = ClaimsAReplica.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def test_without_replicas_a_write_is_a_plain_pipeline(redis_client) -> None:
    for replicas in (0, 1):  # 1: wanted, but the primary has none connected
        replication = Replication(redis_client, replicas=replicas, timeout_ms=60_000)
        with capture_logs() as logs:
            replies = replication.write("test", lambda p: p.set("k", "v").incr("n"))
        assert replies[0] is True and isinstance(replies[1], int)
        assert logs == []


def test_a_replica_that_does_not_acknowledge_is_logged_once_and_the_write_stands(
    lagging, redis_client
) -> None:
    replication = Replication(lagging, replicas=1, timeout_ms=20)
    with capture_logs() as logs:
        first = replication.write("charge", lambda p: p.set("charged", "1"))
        second = replication.write("outcome", lambda p: p.hset("outcomes", "a", "1"))
    assert first == [True] and second == [1]  # the WAIT's own reply is not the caller's
    assert redis_client.get("charged") == "1" and redis_client.hget("outcomes", "a") == "1"
    warnings = [e for e in logs if e["event"] == "replication_unconfirmed"]
    assert len(warnings) == 1 and warnings[0]["write"] == "charge"


def test_a_script_missing_when_the_pipeline_runs_is_loaded_and_sent_again(redis_client) -> None:
    """A pipeline re-sent to a just-promoted replica finds its scripts missing, although it
    checked them on the old primary: here the cache is flushed inside the first pipeline."""
    script = register(redis_client, "note_job")
    builds: list[int] = []

    def build(pipe: Any) -> None:
        if not builds:
            pipe.script_flush()  # after execute() checked the script, before it runs
        builds.append(1)
        script(keys=["idx", "sums"], args=["job-1", "{}", "started_at", 10, 60], client=pipe)

    replies = Replication(redis_client).write("job_index", build)
    assert len(builds) == 2 and replies == [1]
    assert redis_client.zscore("idx", "job-1") is not None


def script_exists_calls(client: redis.Redis) -> int:
    """SCRIPT EXISTS calls so far, not counting this one's own (made so that the count is
    there to read: a server that never had the command lists none)."""
    client.script_exists("0" * 40)
    stats = client.info("commandstats")
    return int(stats["cmdstat_script|exists"]["calls"]) - 1


def test_a_write_with_a_cached_script_is_one_round_trip(redis_client) -> None:
    """redis-py asks SCRIPT EXISTS before every pipeline holding a script: a round trip more
    on each money or outcome write. The write sends its EVALSHA straight away instead."""
    script = register(redis_client, "note_job")
    redis_client.script_load(script.script)
    before = script_exists_calls(redis_client)
    replies = Replication(redis_client).write(
        "job_index",
        lambda pipe: script(
            keys=["idx", "sums"], args=["job-2", "{}", "started_at", 10, 60], client=pipe
        ),
    )
    assert replies == [1]
    assert script_exists_calls(redis_client) == before + 1  # the count's own call, no other


def test_a_script_the_server_never_had_is_loaded_by_the_second_attempt(redis_client) -> None:
    """A restarted server, or a replica just promoted, has none of the scripts the worker
    loaded at start."""
    script = register(redis_client, "note_job")
    redis_client.script_flush()
    builds: list[int] = []

    def build(pipe: Any) -> None:
        builds.append(1)
        script(keys=["idx", "sums"], args=["job-3", "{}", "started_at", 10, 60], client=pipe)

    assert Replication(redis_client).write("job_index", build) == [1]
    assert len(builds) == 2
    assert redis_client.zscore("idx", "job-3") is not None


class RefusesWait(redis.Redis):
    """A managed service that has replicas but does not offer WAIT."""

    def info(self, section: Any = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"connected_slaves": 1}

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.wait = lambda *_: pipe.execute_command("NO-SUCH-COMMAND")  # type: ignore[method-assign]
        return pipe


def test_a_server_without_wait_stops_the_waiting_not_the_writes(redis_server) -> None:
    client = RefusesWait.from_url(redis_server.url, decode_responses=True)
    replication = Replication(client, replicas=1, timeout_ms=20)
    with capture_logs() as logs:
        assert replication.write("charge", lambda p: p.set("charged-2", "1")) == [True]
        assert replication.write("charge", lambda p: p.set("charged-3", "1")) == [True]
    assert replication.replicas == 0
    assert [e["event"] for e in logs] == ["replication_wait_unavailable"]
    client.close()


def test_a_failed_write_still_raises(redis_client) -> None:
    redis_client.set("a-string", "x")
    with pytest.raises(redis.ResponseError):
        Replication(redis_client).write("outcome", lambda p: p.hset("a-string", "f", "v"))
