"""``refgen cancel JOB_ID``: send ``reference_generator.cancel`` by name, as upstream would,
wait for the worker's answer and say what it changed (worker/cancel.py).

The answer comes once the job has ended cancelled, except for a job that was starting: its own
start ends it at its next step, so the command follows the job's event stream to that end."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import redis

from tasks import exit_codes as ex
from tasks.client import JobEvents, JobHistory
from tasks.progress import summary
from worker import constants as c
from worker.cancel import TAKEN
from worker.settings import Settings

_READ_BLOCK_MS = 500


def cancel(job_id: str, reason: str | None, timeout_s: float, settings: Settings) -> int:
    endpoint = settings.redis_endpoint()
    where = endpoint.describe()
    client = endpoint.client(decode_responses=True, socket_connect_timeout=3, socket_timeout=10)
    try:
        client.ping()
        cursor = JobHistory.read(client, job_id).last_id or "0-0"
    except redis.RedisError as exc:
        print(f"refgen: cannot reach Redis at {where}: {exc}", file=sys.stderr)
        return ex.BROKER

    from celery.exceptions import TimeoutError as ResultTimeout

    from tasks.app import app

    app.conf.result_backend_max_retries = 2
    deadline = time.monotonic() + timeout_s
    try:
        sent = app.send_task(c.TASK_CANCEL, kwargs={"job_id": job_id, "reason": reason})
        try:
            answer: dict[str, Any] = sent.get(timeout=timeout_s)
        except ResultTimeout:
            print(
                f"refgen: no worker answered the cancel of job {job_id} within {timeout_s:g} s; "
                "it stays queued and applies when a worker takes it",
                file=sys.stderr,
            )
            return ex.TIMEOUT
        sent.forget()
        print(f"refgen: {answer['message']}", file=sys.stderr)
        if answer["outcome"] == "stopping":
            final = _final_event(JobEvents(client, job_id, cursor), deadline)
            print(
                f"refgen: {summary(final)}"
                if final
                else f"refgen: job {job_id} has not ended yet; it ends when its start goes on",
                file=sys.stderr,
            )
    except redis.RedisError as exc:
        print(f"refgen: lost Redis at {where}: {type(exc).__name__}", file=sys.stderr)
        return ex.BROKER
    print(json.dumps(answer, indent=2))
    if answer["outcome"] == "invalid":
        return ex.INVALID
    return ex.RESULT if answer["outcome"] in TAKEN else ex.ALREADY_ENDED


def _final_event(events: JobEvents, deadline: float) -> dict[str, Any] | None:
    while time.monotonic() < deadline:
        for raw in events.read(block_ms=_READ_BLOCK_MS):
            message = json.loads(raw)
            data = message.get("data") or {}
            if message.get("event_type") == c.EVENT_STAGE_UPDATE and (
                data.get("status") in c.FINAL_STAGE_STATUSES
            ):
                return dict(data)
    return None
