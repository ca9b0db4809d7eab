"""Three real workers share one limit on Replicate creates: the server never sees more.

What the workers' shared budget decided is read where it was decided: the admit and back-off
scripts' own writes (an admission's time, a back-off's end), on the Redis server's clock, as
the server's MONITOR shows them. Arrival times at the fake would also measure how promptly a
loaded machine sent each request once admitted."""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Iterator

import pytest
import redis

from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer
from tests.fakes._http import Fault
from tests.fakes.replicate_server import FakeReplicate
from tests.fakes.supabase_server import FakeSupabaseStorage
from worker import constants as c
from worker.ratelimit import CREATE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
LIMIT = 5  # creates per second, for all workers together


@pytest.fixture
def cluster(tmp_path) -> Iterator[tuple[JobRunner, FakeReplicate]]:
    token, key = "r8_" + secrets.token_hex(16), "sb-" + secrets.token_hex(16)
    with (
        RedisServer() as broker,
        FakeReplicate(api_token=token) as replicate,
        FakeSupabaseStorage(service_key=key) as supabase,
    ):
        env = base_worker_env(broker.url, tmp_path / "unused")
        env.update(
            REPLICATE_API_TOKEN=token,
            REPLICATE_BASE_URL=replicate.url,
            SUPABASE_URL=supabase.url,
            SUPABASE_SERVICE_KEY=key,
            REPLICATE_CREATES_PER_MINUTE=str(LIMIT * 60),
            REFERENCE_GEN_CONCURRENCY="4",
        )
        runner = JobRunner(broker.url)
        workers = [
            WorkerProcess(env, tmp_path / f"w{i}.log", f"w{i}").start(runner.client)
            for i in range(3)
        ]
        try:
            yield runner, replicate
        finally:
            for worker in workers:
                worker.stop()


def run_jobs(runner: JobRunner, plans: list[dict]) -> list:
    results: list = []
    threads = [
        threading.Thread(target=lambda p=p: results.append(runner(p, timeout_s=180))) for p in plans
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class ScriptWrites:
    """Every rate-limit write the workers' scripts make, as Redis's MONITOR reports it."""

    def __init__(self, redis_url: str) -> None:
        self._client = redis.Redis.from_url(redis_url, decode_responses=True)
        self._monitor = self._client.monitor()
        self._monitor.__enter__()  # MONITOR is on before any job is sent
        self.commands: list[list[str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError, ValueError, AttributeError):
            while True:
                command = self._monitor.next_command()
                if command["client_type"] == "lua":
                    self.commands.append(command["command"].split(" "))

    def close(self) -> None:
        self._monitor.__exit__()
        self._thread.join(timeout=10)
        self._client.close()

    def admitted_ms(self) -> list[int]:
        """Each create's admission, in unix ms of the Redis clock (the script's ZADD score)."""
        key = c.replicate_limit_key(CREATE)
        return sorted(int(cmd[2]) for cmd in self.commands if cmd[:2] == ["ZADD", key])

    def back_offs(self) -> list[tuple[int, int]]:
        """Each create back-off: (its end in unix ms of the Redis clock, its length in ms)."""
        key = c.replicate_backoff_key(CREATE)
        return [
            (int(cmd[2]), int(cmd[4]) - 1000)  # SET key until PX length + 1000
            for cmd in self.commands
            if cmd[:2] == ["SET", key]
        ]


@pytest.fixture
def writes(cluster) -> Iterator[ScriptWrites]:
    runner, _ = cluster
    log = ScriptWrites(runner.redis_url)
    yield log
    log.close()


def busiest_window(stamps_ms: list[int], window_ms: int = 1000) -> int:
    stamps = sorted(stamps_ms)
    return max(
        sum(1 for t in stamps[i:] if t < start + window_ms) for i, start in enumerate(stamps)
    )


def test_three_workers_never_exceed_the_shared_limit(cluster, writes, load_plan) -> None:
    runner, replicate = cluster
    runs = run_jobs(runner, [load_plan("large_5x3") for _ in range(4)])  # 32 images, 12 slots
    assert all(run.result["status"] == "success" for run in runs)
    assert len(replicate.requests_for(route="create")) == 32
    admitted = writes.admitted_ms()
    assert len(admitted) == 32  # each create admitted once, by the shared budget
    assert busiest_window(admitted) <= LIMIT
    # It really was throttled: 32 at 5 a window need 7 windows.
    assert admitted[-1] - admitted[0] >= 6 * 1000


def test_a_429_holds_every_worker(cluster, writes, load_plan) -> None:
    runner, replicate = cluster
    body = {"detail": "Request was throttled.", "status": 429}
    replicate.inject("create", Fault(429, body, {"Retry-After": "3"}))
    runs = run_jobs(runner, [load_plan("large_5x3") for _ in range(2)])
    assert all(run.result["status"] == "success" for run in runs)
    [(until_ms, length_ms)] = writes.back_offs()  # one 429, one back-off for everyone
    assert length_ms == 3000  # the server's Retry-After
    admitted = writes.admitted_ms()
    # Admitted before the 429 came back, or once its back-off had passed: never during it.
    assert not [t for t in admitted if until_ms - length_ms < t < until_ms], (until_ms, admitted)
    assert any(t >= until_ms for t in admitted)
