"""``refgen run``: send one job by name, show its progress, print its result.

Progress comes from the job's event stream (``refgen:events:{job_id}``), read from a cursor,
not from pub/sub: pub/sub keeps nothing for a reader that is late, and a worker can refuse a
job, announce it and store the result before this process reads anything. Reading the
stream, the command sees every event published after it sent the job, in order, and it
returns only once it has read them all.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis
from redis.sentinel import MasterNotFoundError

from tasks import exit_codes as ex
from tasks.progress import ProgressView, summary
from worker import constants as c
from worker.errors import InvalidPlanError
from worker.planning import plan_job
from worker.settings import Settings

# A worker takes a job within milliseconds; this long without its "started" means none is
# consuming the queue (or all are busy), which a person waiting should be told.
NO_WORKER_AFTER_S = 5.0
_READ_BLOCK_MS = 500
_READ_BATCH = 200
_RESULT_POLL_S = 1.0
# The result is stored right after the final event; this is how long to wait for it.
_RESULT_WAIT_S = 30.0
NEW_JOB_ID = "new"


@dataclass(frozen=True)
class RunRequest:
    plan_path: Path
    duration_seconds: float | None = None
    job_id: str | None = None
    timeout_s: float = 900.0


def load_plan(request: RunRequest, settings: Settings) -> dict[str, Any]:
    """Read and check the plan before anything is queued. Raises ``InvalidPlanError``."""
    try:
        plan = json.loads(request.plan_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidPlanError(f"Cannot read {request.plan_path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidPlanError(f"{request.plan_path} is not JSON: {exc}") from None
    if not isinstance(plan, dict):
        raise InvalidPlanError(f"{request.plan_path} does not hold a JSON object")
    if request.job_id == NEW_JOB_ID:
        plan["job_id"] = str(uuid.uuid4())
    elif request.job_id is not None:
        plan["job_id"] = request.job_id
    plan_job(
        str(plan.get("job_id")),
        plan,
        request.duration_seconds,
        max_images=settings.max_images_per_job,
        per_minute=settings.budget_per_video_minute,
    )
    return plan


class JobEvents:
    """The job's event stream, read forward from a cursor (exclusive)."""

    def __init__(self, client: redis.Redis, job_id: str, after: str = "0-0") -> None:
        self._redis = client
        self._stream = c.events_stream(job_id)
        self.cursor = after

    def read(self, block_ms: int | None = None) -> list[str]:
        """The next messages; waits up to ``block_ms`` for one when there are none."""
        reply: Any = self._redis.xread(
            {self._stream: self.cursor}, count=_READ_BATCH, block=block_ms
        )
        messages = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.cursor = str(entry_id)
                messages.append(str(fields.get("message", "{}")))
        return messages

    def drain(self) -> list[str]:
        """Every message published so far and not yet read."""
        messages: list[str] = []
        while batch := self.read():
            messages.extend(batch)
        return messages


@dataclass(frozen=True)
class JobHistory:
    """What the job's stream says about a job id before this command sends anything."""

    last_id: str | None
    stage: dict[str, Any] | None  # the latest stage_update's data

    @property
    def running(self) -> bool:
        return self.stage is not None and self.stage.get("status") == "started"

    @property
    def refused(self) -> bool:
        # A refused job may be sent again under its id: nothing of it ran.
        return self.stage is not None and self.stage.get("result_status") in (
            "refused",
            "invalid",
        )

    @classmethod
    def read(cls, client: redis.Redis, job_id: str) -> JobHistory:
        entries: Any = client.xrevrange(c.events_stream(job_id), count=_READ_BATCH)
        last_id = str(entries[0][0]) if entries else None
        for _, fields in entries or []:
            message = json.loads(fields.get("message", "{}"))
            if message.get("event_type") == c.EVENT_STAGE_UPDATE:
                return cls(last_id, message.get("data") or {})
        return cls(last_id, None)


def run(request: RunRequest, settings: Settings) -> int:
    try:
        plan = load_plan(request, settings)
    except InvalidPlanError as exc:
        print(f"refgen: invalid plan: {exc.reason}", file=sys.stderr)
        for detail in exc.details[1:]:
            print(f"  {detail}", file=sys.stderr)
        return ex.INVALID
    job_id = str(plan["job_id"])
    endpoint = settings.redis_endpoint()
    where = endpoint.describe()
    client = endpoint.client(decode_responses=True, socket_connect_timeout=3, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"refgen: cannot reach Redis at {where}: {_why(exc)}", file=sys.stderr)
        return ex.BROKER

    # Celery is imported only once the plan is good: a bad file fails fast.
    from tasks.app import app

    # A client should not sit in the result backend's retry loop while the broker is away;
    # it has its own, bounded, grace period.
    app.conf.result_backend_max_retries = 2
    view = ProgressView()
    start_id: str | None = None
    try:
        result = app.AsyncResult(job_id)
        history = JobHistory.read(client, job_id)
        if result.ready() and not history.refused:
            return _already_ran(request, job_id, history, result.get(timeout=10))
        if history.running and not result.ready():
            view.say(f"job {job_id} is already running; following it")
            cursor = "0-0"
        else:
            if result.ready():
                # A refusal's null answer gives way to this run's.
                result.forget()
            cursor = history.last_id or "0-0"
            # Its own task id, never the job id: a start that fails on the worker stores its
            # failure there (tasks/reference.py), and this command watches for it.
            start_id = str(uuid.uuid4())
            app.send_task(
                c.TASK_START,
                task_id=start_id,
                kwargs={
                    "job_id": job_id,
                    "plan": plan,
                    "duration_seconds": request.duration_seconds,
                },
            )
            view.say(f"sent job {job_id} to {where}")
        return follow(
            app,
            JobEvents(client, job_id, cursor),
            job_id,
            view,
            timeout_s=request.timeout_s,
            settings=settings,
            client=client,
            start_id=start_id,
        )
    except KeyboardInterrupt:
        view.close()
        print(
            f"refgen: interrupted; job {job_id} stays queued or running (run the same "
            f"command again to follow it or to see its result; `refgen cancel {job_id}` "
            "stops it)",
            file=sys.stderr,
        )
        return ex.INTERRUPTED
    except redis.RedisError as exc:
        print(
            f"refgen: lost Redis at {where}: {type(exc).__name__}",
            file=sys.stderr,
        )
        return ex.BROKER
    finally:
        view.close()


class _SafeInterrupt:
    """^C while following a job ends the wait at the loop's next turn (within one read), never
    inside the Redis client, kombu or rich, which can be left holding a lock or a half-read
    reply by a KeyboardInterrupt raised in the middle of them."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self._previous: Any = None

    def __enter__(self) -> _SafeInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, lambda *_: self.asked.set())
        return self

    def __exit__(self, *_: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def check(self) -> None:
        if self.asked.is_set():
            raise KeyboardInterrupt


def follow(
    app: Any,
    events: JobEvents,
    job_id: str,
    view: ProgressView,
    *,
    timeout_s: float,
    settings: Settings,
    client: redis.Redis,
    start_id: str | None = None,
    no_worker_after_s: float = NO_WORKER_AFTER_S,
) -> int:
    """Show the job's events until its final one, then print its result.

    The result is also polled: should events be lost (a Redis restart without persistence),
    the result still ends the wait — but only after every event already published is read,
    so that a refusal's reason is always shown. So is the ``start`` this command sent (by
    ``start_id``), until it has run: a start that failed on the worker ends the wait."""
    from celery.exceptions import TimeoutError as ResultTimeout

    with _SafeInterrupt() as interrupt:
        result = app.AsyncResult(job_id)
        sent = app.AsyncResult(start_id) if start_id is not None else None
        started = time.monotonic()
        deadline = started + timeout_s
        next_poll = 0.0
        warned = False
        while time.monotonic() < deadline:
            interrupt.check()
            try:
                for message in events.read(block_ms=_READ_BLOCK_MS):
                    view.handle(message)
                now = time.monotonic()
                if not view.finished and now >= next_poll:
                    next_poll = now + _RESULT_POLL_S
                    if result.ready():
                        for message in events.drain():
                            view.handle(message)
                        return _print_result(result.get(timeout=_RESULT_WAIT_S), view)
                    if sent is not None and not view.started and sent.failed():
                        return _start_failed(job_id, sent.result, view)
                if view.finished:
                    return _print_result(result.get(timeout=_RESULT_WAIT_S), view)
                if not warned and not view.started and now - started >= no_worker_after_s:
                    warned = True
                    view.say(_no_worker_message(app, job_id, now - started, settings))
            except (redis.RedisError, OSError):
                where = settings.redis_endpoint().describe()
                if not _wait_for_redis(client, where, settings.broker_grace_s, interrupt):
                    return ex.BROKER
            except ResultTimeout:
                break
        view.say(
            f"refgen: no result for job {job_id} after {timeout_s:g} s; "
            "it may still finish (read it by job id)"
        )
        return ex.TIMEOUT


def _start_failed(job_id: str, error: object, view: ProgressView) -> int:
    view.close()
    reason = getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
    print(
        f"refgen: the worker failed to start job {job_id}: {reason}. Nothing was generated; "
        "the worker's log has the details",
        file=sys.stderr,
    )
    return ex.WORKER_FAILED


def _no_worker_message(app: Any, job_id: str, waited_s: float, settings: Settings) -> str:
    queue = str(app.conf.task_default_queue)
    try:
        # Who consumes the job's queue, not who answers: beat and Flower answer pings too.
        answers = app.control.inspect(timeout=1.0).active_queues() or {}
    except Exception:  # a broker hiccup must not end the wait; the loop handles Redis
        answers = {}
    consumers = sum(
        1
        for queues in answers.values()
        if any(isinstance(q, dict) and q.get("name") == queue for q in queues or [])
    )
    where = settings.redis_endpoint().describe()
    if consumers:
        return (
            f"refgen: no worker has taken job {job_id} after {waited_s:.0f} s; {consumers} "
            f"worker(s) consume its queue {queue!r} on {where}, busy with other work; still "
            "waiting"
        )
    if answers:
        return (
            f"refgen: no worker has taken job {job_id} after {waited_s:.0f} s; "
            f"{len(answers)} worker(s) answer on {where} but none consumes the queue "
            f"{queue!r} (REFERENCE_GEN_QUEUES); still waiting"
        )
    return (
        f"refgen: no worker has taken job {job_id} after {waited_s:.0f} s and none answers on "
        f"{where}; start one (`refgen worker`) with the same Redis settings. Still waiting"
    )


def _already_ran(request: RunRequest, job_id: str, history: JobHistory, result: Any) -> int:
    how = summary(history.stage) if history.stage else "its events have expired"
    again = ["refgen", "run", str(request.plan_path)]
    if request.duration_seconds is not None:
        again += ["--duration-seconds", f"{request.duration_seconds:g}"]
    again += ["--job-id", NEW_JOB_ID]
    print(
        f"refgen: job {job_id} has already run ({how}); its result is below and nothing was "
        f"sent.\nrefgen: to run the plan again under a fresh job id: {shlex.join(again)}",
        file=sys.stderr,
    )
    print(json.dumps(result, indent=2, default=_json_default))
    return exit_code(result, history.stage)


def exit_code(result: Any, final: dict[str, Any] | None) -> int:
    if result is not None:
        return ex.RESULT
    if final is not None and final.get("result_status") == "cancelled":
        return ex.CANCELLED
    return ex.TEXT_ONLY


def _wait_for_redis(
    client: redis.Redis, where: str, grace_s: float, interrupt: _SafeInterrupt
) -> bool:
    """Ride out a broker restart or failover; give up, clearly, when it stays gone."""
    print(
        f"refgen: lost Redis at {where}; waiting up to {grace_s:g} s for it to come back",
        file=sys.stderr,
    )
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        interrupt.check()
        try:
            client.ping()
            print("refgen: Redis is back", file=sys.stderr)
            return True
        except (redis.RedisError, OSError):
            time.sleep(1.0)
    print(
        f"refgen: Redis at {where} is gone; the job may still finish on its "
        "workers when it returns (read the result by job id)",
        file=sys.stderr,
    )
    return False


def _why(error: redis.RedisError) -> str:
    if isinstance(error, MasterNotFoundError):
        # Its text lists every Sentinel connection's repr: pages of it.
        return (
            "no Sentinel gave the primary's address (MasterNotFoundError): check "
            "REDIS_SENTINEL_MASTER, and REDIS_SENTINEL_PASSWORD if the Sentinels have one"
        )
    return f"{type(error).__name__}: {str(error)[:300]}"


def _print_result(result: Any, view: ProgressView) -> int:
    view.close()
    print(json.dumps(result, indent=2, default=_json_default))
    return exit_code(result, view.final)


def _json_default(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(type(value).__name__)
