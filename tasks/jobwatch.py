"""Many jobs at once, as a scenario where the order across jobs is the point: plans of a given
size, each job's events as they were published, and the broker's lists of a queue. Shared by
the fairness tests and ``bench.fairness``; nothing here is used by a production worker."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from tasks.harness import JobTimeout
from worker.constants import PRIORITY_LEVELS


def broker_lists(queue: str) -> list[str]:
    """The Redis lists the broker keeps for ``queue``, one per priority level (celeryconfig's
    ``priority_steps``): level 0 is the queue's own name, level n is ``queue + sep + n``."""
    sep = kombu_redis.Channel.sep
    return [queue if level == 0 else f"{queue}{sep}{level}" for level in PRIORITY_LEVELS]


def sized_plan(scenes: int, characters: int, *, label: str = "s") -> dict[str, Any]:
    """A valid plan of ``scenes + characters`` images under a fresh job id; image ids are
    ``{label}_scene_{i}`` and ``{label}_character_{i}``, so a test can make one of them flaky."""
    return {
        "job_id": str(uuid.uuid4()),
        "video_summary": f"A {scenes + characters}-image job",
        "scenes": [
            {"id": f"{label}_scene_{i}", "description": f"Place number {i} at dusk"}
            for i in range(scenes)
        ],
        "characters": [
            {"id": f"{label}_character_{i}", "description": f"Person number {i} in a red coat"}
            for i in range(characters)
        ],
        "style": {"color_palette": ["#112233", "#445566"], "visual_style": "flat"},
    }


@dataclass
class Timeline:
    """One job's events as they were published, with ``published_at`` (the Redis clock) and
    when this process sent the job and saw its end (``time.perf_counter``)."""

    job_id: str
    sent_at: float
    events: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    ended_at: float | None = None

    @property
    def end(self) -> tuple[dict[str, Any], float]:
        """The final ``stage_update`` and when it was published."""
        for event_type, data, published_at in self.events:
            if event_type == "stage_update" and data["status"] != "started":
                return data, published_at
        raise LookupError(f"job {self.job_id} has not ended")

    @property
    def latency_s(self) -> float:
        """From sending the job to seeing its final event, on this process's clock."""
        if self.ended_at is None:
            raise LookupError(f"job {self.job_id} has not ended")
        return self.ended_at - self.sent_at

    def published(self, event_type: str, **match: Any) -> list[float]:
        return [
            at
            for t, d, at in self.events
            if t == event_type and all(d.get(k) == v for k, v in match.items())
        ]


class JobWatch:
    """Sends many jobs by name, as upstream does, and records every event of each on its
    channel as it arrives (on a thread of its own, so a job that ends while more are being
    sent is timed when it ends): for scenarios where the order across jobs is the point."""

    def __init__(self, redis_url: str, client: Celery) -> None:
        self.client = client
        self._redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self._listener = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._listener.psubscribe("job_events:*")
        self.jobs: dict[str, Timeline] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, name="job-watch", daemon=True)
        self._reader.start()

    def send(self, plan: dict[str, Any]) -> None:
        job_id = str(plan["job_id"])
        with self._changed:
            self.jobs[job_id] = Timeline(job_id, time.perf_counter())
        # ignore_result: start stores none, and waiting for one would subscribe this client to
        # a channel for nothing.
        self.client.send_task(
            "reference_generator.start",
            kwargs={"job_id": job_id, "plan": plan},
            ignore_result=True,
        )

    def _read(self) -> None:
        while not self._stop.is_set():
            message = self._listener.get_message(timeout=0.1)
            if message is None:
                continue
            received = time.perf_counter()
            body = json.loads(message["data"])
            with self._changed:
                job = self.jobs.get(str(message["channel"]).removeprefix("job_events:"))
                if job is None:
                    continue
                job.events.append((body["event_type"], body["data"], float(body["published_at"])))
                if body["event_type"] == "stage_update" and body["data"]["status"] != "started":
                    job.ended_at = received
                    self._changed.notify_all()

    def wait(self, timeout_s: float = 120) -> dict[str, Timeline]:
        """Until every job sent has ended; raises ``JobTimeout`` otherwise."""
        with self._changed:
            ended = self._changed.wait_for(
                lambda: all(job.ended_at is not None for job in self.jobs.values()), timeout_s
            )
            if not ended:
                pending = [j for j, job in self.jobs.items() if job.ended_at is None]
                raise JobTimeout(f"{len(pending)} job(s) did not end in {timeout_s} s")
            return dict(self.jobs)

    def close(self) -> None:
        self._stop.set()
        self._reader.join()
        self._listener.close()
        self._redis.close()
