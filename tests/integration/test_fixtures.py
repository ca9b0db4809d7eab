"""The fixtures that start real processes leave none behind when their own start fails: a
Sentinel cluster whose Sentinels never agree once left four redis-servers running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.harness import WorkerProcess, bare_client, local_worker_env
from tasks.localredis import RedisServer
from tests.integration.sentinel import SentinelCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class NeverAgreeing(SentinelCluster):
    def _sentinels_agree(self) -> bool:
        return False


def test_a_sentinel_cluster_that_fails_to_start_stops_what_it_started() -> None:
    cluster = NeverAgreeing()
    started: list[int] = []
    original = cluster._wait

    def wait(ready: object, what: str, timeout_s: float = 30) -> None:
        started.extend(pid for pid in cluster.pids if pid not in started)
        original(ready, what, timeout_s)

    cluster._wait = wait  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="the Sentinels to know each other"):
        cluster.start(timeout_s=10)
    assert len(started) == 5  # the primary, the replica and the three Sentinels
    assert not [pid for pid in started if alive(pid)]


def test_a_worker_that_never_answers_is_stopped_not_left(tmp_path: Path) -> None:
    with RedisServer() as broker, RedisServer() as elsewhere:
        # The worker listens on one Redis, the test pings on another: it never answers.
        env = local_worker_env(broker.url, tmp_path / "storage")
        worker = WorkerProcess(env, tmp_path / "worker.log", "deaf")
        with pytest.raises(RuntimeError, match="worker not ready"):
            worker.start(bare_client(elsewhere.url), timeout_s=5)
        assert worker.process is not None and not alive(worker.process.pid)
