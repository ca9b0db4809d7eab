"""Support for the crash campaign (``test_crash_points.py``): a cluster per scenario (its own
``redis-server``, Replicate-like server and real workers), a record of everything a job left
behind, and the invariants every scenario must keep, checked with a description of what
happened when one does not hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis

from tasks.harness import JobRunner, WorkerProcess, replicate_worker_env
from tasks.localredis import RedisServer
from tests.fakes.replicate_server import FakeReplicate
from worker import constants as c
from worker.budget import from_nano, to_nano
from worker.models import ImageOutcome
from worker.threshold import decide_status

PRICE = Decimal("0.000725")  # the worker's default $/s of predict_time
LEASE_TTL_S = 2.0
PREDICTION_S = 1.0


@dataclass
class Report:
    """What one scenario saw, kept whole so that a failing check can say what happened."""

    name: str
    job_id: str = ""
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    live: list[dict[str, Any]] = field(default_factory=list)  # pub/sub, as subscribers saw it
    stream: list[dict[str, Any]] = field(default_factory=list)  # replayed from the stream
    result: Any = "<not read>"
    outcomes: dict[str, ImageOutcome] = field(default_factory=dict)
    total_images: int = 0
    spent: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)
    image_costs: dict[str, Decimal] = field(default_factory=dict)
    creates_per_image: Counter[str] = field(default_factory=Counter)
    billed: Decimal = Decimal(0)
    leftovers: dict[str, Any] = field(default_factory=dict)
    crashed: bool = False
    log_tails: dict[str, str] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(f"{time.strftime('%H:%M:%S')} {text}")

    def describe(self) -> str:
        lines = [f"scenario {self.name}, job {self.job_id}"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines.append(f"  result by job id: {json.dumps(self.result)[:400]}")
        lines.append("  events replayed from the stream:")
        lines += [f"    {_short(e)}" for e in self.stream]
        lines.append(f"  live events seen: {len(self.live)}")
        lines.append(f"  outcomes: { {k: o.ok for k, o in self.outcomes.items()} }")
        lines.append(f"  creates per image: {dict(self.creates_per_image)}")
        lines.append(f"  spent {self.spent}, billed {self.billed}, reserved {self.reserved}")
        lines.append(f"  image costs: { {k: str(v) for k, v in self.image_costs.items()} }")
        lines.append(f"  left behind: {self.leftovers}")
        for name, tail in self.log_tails.items():
            lines.append(f"  --- {name} log (tail) ---")
            lines += [f"    {line}" for line in tail.splitlines()[-25:]]
        return "\n".join(lines)

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [e for e in self.stream if _is_final(e)]


def _is_final(event: dict[str, Any]) -> bool:
    return event.get("event_type") == "stage_update" and event["data"]["status"] != "started"


def _short(event: dict[str, Any]) -> str:
    data = {k: v for k, v in event.get("data", {}).items() if k not in ("image_url", "stage")}
    return f"{event.get('event_type')} {json.dumps(data)[:160]}"


class Cluster:
    """One scenario's world: a redis-server (AOF, so it survives a restart), a Replicate-like
    server, and real worker processes started and killed by the scenario."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.tmp = tmp
        self.broker = RedisServer(appendonly=True).start()
        self.fake = FakeReplicate(api_token="r8_" + os.urandom(12).hex()).start()
        self.fake.default_plan = type(self.fake.default_plan)(
            duration=PREDICTION_S, predict_time=PREDICTION_S
        )
        self.env = replicate_worker_env(
            self.broker.url, tmp / "storage", self.fake.url, self.fake.api_token or ""
        )
        self.env.update(
            LEASE_TTL_S=str(LEASE_TTL_S),
            JOB_DEADLINE_S="240",
            IMAGE_TIMEOUT_S="30",
            REFGEN_CRASH_FUSE=str(tmp / "crash.fuse"),
        )
        self.env.update(env)
        self.runner = JobRunner(self.broker.url)
        self.workers: dict[str, WorkerProcess] = {}
        self.redis = redis.Redis.from_url(self.broker.url, decode_responses=True)

    def start_worker(self, name: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess({**self.env, **env}, self.tmp / f"{name}.log", name)
        self.workers[name] = worker.start(self.runner.client)
        return worker

    def signal(self, name: str, sig: signal.Signals) -> None:
        process = self.workers[name].process
        assert process is not None
        os.killpg(process.pid, sig)

    @property
    def crashed(self) -> bool:
        return (self.tmp / "crash.fuse").exists()

    def close(self) -> None:
        for worker in self.workers.values():
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGCONT)
            worker.stop()
        self.fake.stop()
        self.broker.cleanup()


class LiveListener:
    """Subscribes before the job is sent (pub/sub keeps nothing for late listeners) and keeps
    every message until the final stage_update."""

    def __init__(self, url: str, job_id: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self.done = threading.Event()
        self._pubsub = redis.Redis.from_url(url, decode_responses=True).pubsub(
            ignore_subscribe_messages=True
        )
        self._pubsub.subscribe(c.events_channel(job_id))
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self.done.is_set():
            try:
                message = self._pubsub.get_message(timeout=0.2)
            except (redis.RedisError, OSError):
                time.sleep(0.2)  # the scenario restarts Redis: nothing can be heard meanwhile
                continue
            if message is not None:
                body = json.loads(message["data"])
                self.messages.append(body)
                if _is_final(body):
                    self.done.set()

    def close(self) -> None:
        self.done.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.close()


def send(cluster: Cluster, plan: dict[str, Any], report: Report) -> LiveListener:
    report.job_id = plan["job_id"]
    listener = LiveListener(cluster.broker.url, plan["job_id"])
    cluster.runner.client.send_task(
        c.TASK_START, kwargs={"job_id": plan["job_id"], "plan": plan, "duration_seconds": 180}
    )
    report.note("job sent")
    return listener


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s for {what}")
        time.sleep(0.05)


def collect(cluster: Cluster, listener: LiveListener, report: Report, timeout_s: float) -> None:
    """Wait for the job to end, then read everything it left behind."""
    job = c.JobKeys(report.job_id)
    try:
        wait_for(listener.done.is_set, timeout_s, "the final stage_update")
        report.note("final stage_update heard")
        report.result = cluster.runner.client.AsyncResult(report.job_id).get(timeout=30)
    except Exception as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        listener.close()
    report.live = list(listener.messages)
    r = cluster.redis
    # Whatever the job still holds goes within a few heartbeats of its end.
    with contextlib.suppress(TimeoutError):
        wait_for(
            lambda: _leftovers(r, report.job_id) == {}, 4 * LEASE_TTL_S, "the job's holds to go"
        )
    report.leftovers = _leftovers(r, report.job_id)
    report.stream = [
        json.loads(fields["message"]) for _, fields in r.xrange(c.events_stream(report.job_id))
    ]
    report.outcomes = {
        str(k): ImageOutcome.model_validate_json(v) for k, v in r.hgetall(job.images).items()
    }
    report.total_images = int(r.hget(job.meta, "total_images") or 0)
    ledger = r.hgetall(job.ledger)
    report.spent = Decimal(int(ledger.get("spent", 0))) / 10**9
    report.reserved = Decimal(int(ledger.get("reserved", 0))) / 10**9
    costs: Counter[str] = Counter()
    for field_name, nano in r.hgetall(job.charges).items():
        costs[field_name.split("|", 1)[0]] += int(nano)
    report.image_costs = {k: Decimal(v) / 10**9 for k, v in costs.items()}
    # The seed is drawn per image when the job starts, and kept by its retries.
    report.creates_per_image = Counter(
        f"{call.input['seed']} {_image_of(call.input['prompt'])}" for call in cluster.fake.creates
    )
    # Each bill rounded up to the nano-dollar, as the ledger records money.
    report.billed = sum(
        (from_nano(to_nano(b)) for b in cluster.fake.bills(PRICE).values()), Decimal(0)
    )
    report.crashed = cluster.crashed
    report.log_tails = {
        name: w.log_path.read_text(errors="replace")[-4000:]
        for name, w in cluster.workers.items()
        if w.log_path.exists()
    }


def _image_of(prompt: str) -> str:
    return prompt.split(",", 1)[0][:40]


def _leftovers(r: redis.Redis, job_id: str) -> dict[str, Any]:
    job = c.JobKeys(job_id)
    found: dict[str, Any] = {}
    leases = r.zrange(c.LEASES, 0, -1)
    if leases:
        found["leases"] = leases
    locks = list(r.scan_iter(match=job.image_lock("*"), count=1000))
    if locks:
        found["image_locks"] = locks
    reservations = r.hgetall(job.reservations)
    if reservations:
        found["reservations"] = reservations
    return found


def check_invariants(
    report: Report, expected_status: str | None, *, live_may_miss: bool = False
) -> None:
    """Every scenario, whatever was killed and when: the job ended once, with the result the
    threshold decides for the images that exist, paid once per prediction, and left nothing
    held."""

    def require(condition: bool, what: str) -> None:
        if not condition:
            raise AssertionError(f"{what}\n{report.describe()}")

    require(report.error is None, "the job did not end cleanly")
    require(len(report.finals) == 1, f"{len(report.finals)} final stage_updates, not one")
    final = report.finals[0]["data"]
    made = [o for o in report.outcomes.values() if o.ok]
    decided = decide_status(list(report.outcomes.values()), report.total_images)
    require(
        len(report.outcomes) == report.total_images,
        f"{len(report.outcomes)} outcomes recorded for {report.total_images} images",
    )
    require(
        (report.result or {}).get("status") == decided if decided else report.result is None,
        f"the result is not what the threshold decides ({decided}) for what was made",
    )
    require(
        final["result_status"] == (decided or "text_only"),
        f"the final event says {final['result_status']}, the threshold {decided}",
    )
    require(final["successful_images"] == len(made), "final event and record disagree")
    require(
        expected_status is None or decided == expected_status,
        f"expected a {expected_status} job, got {decided}",
    )
    require(
        all(n <= 1 for n in report.creates_per_image.values()),
        "an image's prediction was created more than once",
    )
    references = (report.result or {}).get("scene_references", []) + (report.result or {}).get(
        "character_references", []
    )
    require(
        sum((Decimal(r["cost"]) for r in references), Decimal(0))
        == sum(
            (report.image_costs.get(k, Decimal(0)) for k, o in report.outcomes.items() if o.ok),
            Decimal(0),
        ),
        "the result's image costs are not the ledger's",
    )
    require(
        report.spent == sum(report.image_costs.values(), Decimal(0)),
        "recorded cost is not the sum of the image costs",
    )
    require(report.spent == report.billed, "recorded cost is not what the server billed")
    require(
        report.result is None or Decimal(report.result["total_cost"]) == report.spent,
        "total_cost is not the recorded cost",
    )
    if live_may_miss:  # Redis was down: pub/sub delivers nothing to a listener meanwhile
        remaining = iter(report.stream)
        require(
            all(any(e == s for s in remaining) for e in report.live),
            "the live events are not in the replayed order",
        )
    else:
        require(report.live == report.stream, "the replayed events are not the live events")
    progress = [e["data"]["progress"] for e in report.stream if e["event_type"] == "progress"]
    require(progress == sorted(progress), "progress went backwards")
    require(report.leftovers == {}, "the job left something held")
    require(report.reserved == 0, "a reservation was left in the ledger")


def run_scenario(name: str, body: Callable[[Report], None]) -> Report:
    """Run one scenario to its end, never raising: what went wrong is in the report."""
    report = Report(name=name)
    try:
        body(report)
    except Exception:
        report.error = traceback.format_exc(limit=6)
    return report
