"""Replicate's request budget, against a real redis-server (its Lua and clock are the point),
and the transport that enforces it on every request the official client sends."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
import redis
import replicate

from worker import constants as c
from worker.errors import RateLimitedError
from worker.ratelimit import (
    ADMITTED_EXTENSION,
    CREATE,
    DEADLINE_EXTENSION,
    OTHER,
    BudgetTransport,
    RedisRateGate,
    ReplicateBudget,
    request_kind,
    window_for,
)


@pytest.fixture(autouse=True)
def clean(redis_client) -> None:
    for kind in (CREATE, OTHER):
        redis_client.delete(c.replicate_limit_key(kind), c.replicate_backoff_key(kind))


@dataclass
class Admissions:
    """What a gate's admit script answered, and when (on the Redis clock) it admitted."""

    answers: list[int] = field(default_factory=list)  # 0 admitted, else ms to wait
    at_ms: list[float] = field(default_factory=list)  # each admission's score, unix ms
    lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, gate: RedisRateGate, client: redis.Redis) -> RedisRateGate:
        """Reads each admission's score in the same transaction as the script that wrote
        it: the time the gate itself used, not a moment this (maybe starved) thread saw."""
        script = gate._admit

        def admit(keys: list[str], args: list[object]) -> int:
            pipe = client.pipeline(transaction=True)
            script(keys=keys, args=args, client=pipe)
            pipe.zscore(keys[0], str(args[2]))
            answer, score = pipe.execute()
            with self.lock:
                self.answers.append(int(answer))
                if int(answer) <= 0:
                    self.at_ms.append(float(score))
            return int(answer)

        gate._admit = admit  # type: ignore[method-assign]
        return gate


def back_off_until_ms(client: redis.Redis, kind: str = CREATE) -> float:
    return float(client.get(c.replicate_backoff_key(kind)))


def test_no_more_than_the_limit_in_any_window_across_threads(redis_client) -> None:
    admissions = Admissions()

    def worker() -> None:
        gate = RedisRateGate(redis_client, limit=5, window_s=0.5, guard_s=0.02)
        admissions.watch(gate, redis_client)
        for _ in range(3):
            gate.acquire(deadline_s=10)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    admitted = sorted(admissions.at_ms)
    assert len(admitted) == 18
    for i, start in enumerate(admitted):
        in_window = [t for t in admitted[i:] if t < start + 500]
        assert len(in_window) <= 5
    assert admitted[-1] - admitted[0] >= 1000  # 18 creates at 5 per 0.5 s need 3 windows
    assert any(answer > 0 for answer in admissions.answers)  # some were told to wait


def test_back_off_holds_everyone(redis_client) -> None:
    gate = RedisRateGate(redis_client, limit=100)
    gate.back_off(0.6)
    until_ms = back_off_until_ms(redis_client)
    another = Admissions()  # another worker
    another.watch(RedisRateGate(redis_client, limit=100), redis_client).acquire(deadline_s=5)
    assert another.answers[0] > 0  # held by the back-off...
    assert another.answers[-1] == 0 and len(another.at_ms) == 1
    assert another.at_ms[0] >= until_ms  # ...and admitted only once it had passed


def test_gives_up_retryably_past_its_deadline(redis_client) -> None:
    gate = RedisRateGate(redis_client, limit=1, window_s=10)
    gate.acquire(deadline_s=1)
    with pytest.raises(RateLimitedError) as info:
        gate.acquire(deadline_s=0.2)
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 1


def test_an_admission_run_again_is_still_admitted_and_takes_one_slot(redis_client) -> None:
    """Issue 20, item 7: redis-py re-sends the script when its reply is lost. Run again, the
    admission found the window full of itself (or a back-off set since) and said wait, so the
    request waited, then took a second slot under a new member."""
    gate = RedisRateGate(redis_client, limit=1, window_s=10)
    script = gate._admit

    def sent_twice(keys: list[str], args: list[object]) -> int:
        script(keys=keys, args=args)  # admitted; its reply lost
        gate.back_off(10)  # a 429 elsewhere meanwhile
        return int(script(keys=keys, args=args))

    gate._admit = sent_twice  # type: ignore[method-assign]
    gate.acquire(deadline_s=0)
    assert redis_client.zcard(c.replicate_limit_key(CREATE)) == 1


def test_a_limit_a_minute_is_paced_a_second_at_a_time() -> None:
    assert window_for(600) == (10, 1.0)
    assert window_for(3000) == (50, 1.0)
    assert window_for(120) == (2, 1.0)
    assert window_for(30) == (1, 2.0)  # below one a second: one per window, same rate


def test_the_two_kinds_have_separate_windows_and_back_offs(redis_client) -> None:
    budget = ReplicateBudget.in_redis(redis_client, creates_per_minute=60, requests_per_minute=120)
    budget.admit(CREATE, time.monotonic() + 1)
    with pytest.raises(RateLimitedError):  # one create a second
        budget.admit(CREATE, time.monotonic() + 0.3)
    budget.admit(OTHER, time.monotonic() + 0.1)  # the other budget is untouched
    budget.admit(OTHER, time.monotonic() + 0.1)
    # Longer than the window (two a second): only the back-off can hold the next one so long.
    budget.back_off(OTHER, 1.5)
    until_ms = back_off_until_ms(redis_client, OTHER)
    others = Admissions()
    others.watch(budget._gates[OTHER], redis_client)  # type: ignore[arg-type]
    budget.admit(OTHER, time.monotonic() + 5)
    assert others.answers[0] > 0 and len(others.at_ms) == 1
    assert others.at_ms[0] >= until_ms  # admitted once its back-off had passed
    for kind in (CREATE, OTHER):
        assert redis_client.pttl(c.replicate_limit_key(kind)) > 0  # nothing kept for ever


# ----------------------------------------------------------------------- the transport
class RecordingBudget:
    def __init__(self) -> None:
        self.admitted: list[tuple[str, float]] = []
        self.backed_off: list[tuple[str, float]] = []

    def admit(self, kind: str, until: float) -> None:
        self.admitted.append((kind, until))

    def back_off(self, kind: str, seconds: float) -> None:
        self.backed_off.append((kind, seconds))


def replicate_like(request: httpx.Request) -> httpx.Response:
    if request.url.path.endswith("/throttled"):
        return httpx.Response(
            429, json={"detail": "Request was throttled."}, headers={"Retry-After": "7"}
        )
    return httpx.Response(200, json={"ok": True})


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("POST", "/v1/predictions", CREATE),
        ("POST", "/v1/models/stability-ai/sdxl/predictions", CREATE),
        ("POST", "/v1/deployments/acme/app/predictions", CREATE),
        ("POST", "/v1/predictions/abc/cancel", OTHER),
        ("GET", "/v1/predictions/abc", OTHER),
        ("GET", "/v1/predictions", OTHER),
    ],
)
def test_requests_are_told_apart(method: str, path: str, kind: str) -> None:
    assert request_kind(httpx.Request(method, f"https://api.replicate.com{path}")) == kind


def test_every_request_waits_for_its_budget_and_a_429_backs_off_its_kind() -> None:
    budget, throttled = RecordingBudget(), []
    transport = BudgetTransport(
        httpx.MockTransport(replicate_like), budget, on_throttled=lambda: throttled.append(1)
    )
    with httpx.Client(transport=transport, base_url="https://api.replicate.com") as client:
        until = time.monotonic() + 42
        client.post("/v1/predictions", json={}, extensions={DEADLINE_EXTENSION: until})
        client.get("/v1/predictions/abc")
        client.post("/v1/predictions", json={}, extensions={ADMITTED_EXTENSION: True})
        assert client.get("/v1/throttled").status_code == 429
    assert budget.admitted[0] == (CREATE, until)
    assert budget.admitted[1][0] == OTHER and budget.admitted[1][1] > time.monotonic() + 20
    assert [k for k, _ in budget.admitted] == [CREATE, OTHER, OTHER]  # admitted: not again
    assert budget.backed_off == [(OTHER, 7.0)] and throttled == [1]


def test_the_clients_own_retries_pass_through_the_budget() -> None:
    """replicate's RetryTransport retries a throttled GET by itself; each retry is counted."""
    calls: list[str] = []

    def throttle_twice(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= 2:
            return httpx.Response(429, json={"detail": "throttled"}, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"id": "abc", "status": "processing"})

    budget = RecordingBudget()
    client = replicate.Client(
        api_token="r8_unit_test_token_made_here",
        base_url="https://api.replicate.com",
        transport=BudgetTransport(httpx.MockTransport(throttle_twice), budget),
    )
    assert client._client.get("/v1/predictions/abc").status_code == 200
    assert len(calls) == 3
    assert [k for k, _ in budget.admitted] == [OTHER] * 3
    assert [k for k, _ in budget.backed_off] == [OTHER] * 2


@pytest.mark.parametrize("header", ["3600", "1e9", "inf"])
def test_a_long_retry_after_backs_everyone_off_for_at_most_the_cap(header: str) -> None:
    """Issue 20, item 9: the shared back-off stops every worker's requests of the kind; one
    long Retry-After must not stop them for an hour (README: at most 30 s)."""
    budget = RecordingBudget()

    def throttled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"detail": "throttled"}, headers={"Retry-After": header})

    transport = BudgetTransport(httpx.MockTransport(throttled), budget)
    with httpx.Client(transport=transport, base_url="https://api.replicate.com") as client:
        client.get("/v1/predictions/abc")
    assert budget.backed_off == [(OTHER, c.RETRY_AFTER_CAP_S)]


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_a_back_off_run_again_does_not_push_the_hold_later(redis_client) -> None:
    """Issue 20, item 7: redis-py sends a command again after a timeout (up to 30 s later);
    the back-off run again counted its hold from then, holding every worker for longer than
    the 429 asked."""
    marks = c.replicate_backoff_request_key(CREATE, "*")
    for earlier in redis_client.keys(marks):  # other tests' back-offs
        redis_client.delete(earlier)
    gate = RedisRateGate(redis_client, limit=100)
    script, first_run = gate._back_off, []

    def sent_twice(**call: object) -> object:
        script(**call)
        first_run.append(back_off_until_ms(redis_client))
        first_ms = redis_ms(redis_client)
        while redis_ms(redis_client) <= first_ms + 2:
            time.sleep(0.001)  # the retry lands later, on the server's clock
        return script(**call)  # the same keys and arguments, as a retry sends them

    gate._back_off = sent_twice  # type: ignore[method-assign]
    gate.back_off(5)
    assert first_run and back_off_until_ms(redis_client) == first_run[0]
    # A command is sent again after a 30 s socket timeout: the mark outlives the back-off.
    (mark,) = redis_client.keys(marks)
    assert redis_client.pttl(mark) > 5 * 30_000
