"""``refgen run``: send one job by name, show its progress, print its result."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from tasks.progress import ProgressView
from worker import constants as c
from worker.errors import InvalidPlanError
from worker.planning import plan_job
from worker.settings import Settings

EXIT_RESULT, EXIT_TEXT_ONLY, EXIT_INVALID, EXIT_BROKER, EXIT_TIMEOUT = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class RunRequest:
    plan_path: Path
    duration_seconds: float | None = None
    job_id: str | None = None
    timeout_s: float = 900.0


def safe_url(url: str) -> str:
    """The broker URL without its password, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"


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
    if request.job_id is not None:
        plan["job_id"] = request.job_id
    plan_job(
        str(plan.get("job_id")),
        plan,
        request.duration_seconds,
        max_images=settings.max_images_per_job,
        per_minute=settings.budget_per_video_minute,
    )
    return plan


def run(request: RunRequest, settings: Settings) -> int:
    try:
        plan = load_plan(request, settings)
    except InvalidPlanError as exc:
        print(f"refgen: invalid plan: {exc.reason}", file=sys.stderr)
        for detail in exc.details[1:]:
            print(f"  {detail}", file=sys.stderr)
        return EXIT_INVALID
    job_id = str(plan["job_id"])
    client = redis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_connect_timeout=3, socket_timeout=5
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        print(
            f"refgen: cannot reach Redis at {safe_url(settings.redis_url)}: {exc}", file=sys.stderr
        )
        return EXIT_BROKER

    # Celery is imported only once the plan is good: a bad file fails fast.
    from tasks.app import app

    # A client should not sit in the result backend's retry loop while the broker is away;
    # it has its own, bounded, grace period.
    app.conf.result_backend_max_retries = 2

    channel = c.events_channel(job_id)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    # Subscribe before sending: pub/sub keeps nothing for late listeners.
    pubsub.subscribe(channel)
    app.send_task(
        c.TASK_START,
        kwargs={"job_id": job_id, "plan": plan, "duration_seconds": request.duration_seconds},
    )
    view = ProgressView()
    result = app.AsyncResult(job_id)
    deadline = time.monotonic() + request.timeout_s
    next_poll = 0.0
    try:
        while time.monotonic() < deadline:
            try:
                message = pubsub.get_message(timeout=0.5)
                if message is not None:
                    view.handle(message["data"])
                now = time.monotonic()
                # Events can be missed (a duplicate job, a broker restart): the result is
                # the truth.
                if view.finished or now >= next_poll:
                    next_poll = now + 1.0
                    if result.ready():
                        return _print_result(result.get(timeout=10))
            except (redis.RedisError, OSError):
                if not _wait_for_redis(client, settings.redis_url, settings.broker_grace_s):
                    return EXIT_BROKER
                pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(channel)
        print(
            f"refgen: no result for job {job_id} after {request.timeout_s:g} s; "
            "it may still finish (read it by job id)",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    finally:
        view.close()
        pubsub.close()


def _wait_for_redis(client: redis.Redis, url: str, grace_s: float) -> bool:
    """Ride out a broker restart; give up, clearly, when it stays gone."""
    print(
        f"refgen: lost Redis at {safe_url(url)}; waiting up to {grace_s:g} s for it to come back",
        file=sys.stderr,
    )
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        try:
            client.ping()
            print("refgen: Redis is back", file=sys.stderr)
            return True
        except (redis.RedisError, OSError):
            time.sleep(1.0)
    print(
        f"refgen: Redis at {safe_url(url)} is gone; the job may still finish on its "
        "workers when it returns (read the result by job id)",
        file=sys.stderr,
    )
    return False


def _print_result(result: Any) -> int:
    print(json.dumps(result, indent=2, default=_json_default))
    return EXIT_RESULT if result is not None else EXIT_TEXT_ONLY


def _json_default(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(type(value).__name__)
