"""The real backlog of the broker, for autoscalers: what waits on each queue, what workers hold
unacknowledged, and how long the oldest waiting message has waited.

With priorities on, kombu's Redis transport keeps each queue as one list per priority level
(``reference_generator``, ``reference_generator\\x06\\x161``, … ``\\x06\\x169``), and a scaler
that reads one list (KEDA's Redis list scaler, celery-exporter) sees a part of the queue.
Messages a worker has taken are in kombu's ``unacked`` hash until acknowledged: the running
tasks, the ones reserved for a free slot, and retries waiting out their countdown. This reads
all of them at scrape time (``BacklogCollector``, served by the gateway's ``/metrics``), by
kombu's names for the keys (``worker/constants.py``; the gateway does not import kombu, and a
test holds the names to kombu's).

A message's age: Celery's messages carry no send time, so every message our processes publish
is stamped with one (``SENT_AT_HEADER``, ``tasks/app.py``, the sender's clock). A message sent
without it (an upstream ``start`` from a bare Celery client) counts from when a scrape first
saw it at the head of its list (kept in Redis, ``backlog_first_seen.lua``): exact for a queue
nobody consumes, an underestimate by the time it waited behind others otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.commands.core import Script

from worker import constants as c
from worker.scripts import register

FIRST_SEEN = "refgen:backlog:first-seen"  # hash: delivery tag -> unix seconds first seen
OTHER = "other"  # the label of messages held from a queue this gateway does not watch


def priority_lists(queue: str) -> list[str]:
    """The Redis lists of a queue, one per priority level, named as kombu names them."""
    return [
        queue if level == 0 else f"{queue}{c.KOMBU_PRIORITY_SEP}{level}"
        for level in c.PRIORITY_LEVELS
    ]


@dataclass
class QueueBacklog:
    waiting: int = 0
    unacked: int = 0
    oldest_age_s: float = 0.0  # 0 when nothing waits


@dataclass
class Backlog:
    queues: dict[str, QueueBacklog] = field(default_factory=dict)


def read_backlog(client: redis.Redis, queues: Sequence[str], first_seen: Script) -> Backlog:
    """Every list of every queue (lengths and heads), the unacked hash, in few round trips.
    ``first_seen`` is ``backlog_first_seen.lua`` registered on ``client``."""
    lists = [(queue, name) for queue in queues for name in priority_lists(queue)]
    pipe = client.pipeline(transaction=False)
    pipe.time()
    for _, name in lists:
        pipe.llen(name)
        pipe.lindex(name, -1)  # LPUSH in, BRPOP out: the right end is the oldest
    replies = pipe.execute()
    seconds, micros = replies[0]
    now = seconds + micros / 1_000_000
    backlog = Backlog({queue: QueueBacklog() for queue in queues})
    heads: list[tuple[str, dict[str, Any]]] = []
    for (queue, _), length, head in zip(lists, replies[1::2], replies[2::2], strict=True):
        backlog.queues[queue].waiting += int(length)
        if head is not None:
            heads.append((queue, _parse(head)))
    for queue, sent_at in _sent_times(first_seen, heads):
        entry = backlog.queues[queue]
        entry.oldest_age_s = max(entry.oldest_age_s, now - sent_at)
    for _, entry in client.hscan_iter(c.KOMBU_UNACKED, count=500):
        routing_key = _routing_key(entry)
        label = routing_key if routing_key in backlog.queues else OTHER
        backlog.queues.setdefault(label, QueueBacklog()).unacked += 1
    return backlog


def _sent_times(
    first_seen: Script, heads: list[tuple[str, dict[str, Any]]]
) -> list[tuple[str, float]]:
    """When each head was sent: its stamp, or when it was first seen at the head."""
    stamped, unstamped = [], []
    for queue, message in heads:
        sent_at = (message.get("headers") or {}).get(c.SENT_AT_HEADER)
        if isinstance(sent_at, int | float) and not isinstance(sent_at, bool):
            stamped.append((queue, float(sent_at)))
        else:
            tag = str((message.get("properties") or {}).get("delivery_tag") or "")
            unstamped.append((queue, tag))
    times = first_seen(keys=[FIRST_SEEN], args=[tag for _, tag in unstamped])
    return stamped + [(queue, float(t)) for (queue, _), t in zip(unstamped, times, strict=True)]


def _parse(raw: object) -> dict[str, Any]:
    try:
        message = json.loads(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return {}
    return message if isinstance(message, dict) else {}


def _routing_key(raw: object) -> str:
    """An unacked entry is ``[message, exchange, routing_key]`` (kombu's ``QoS.append``)."""
    try:
        entry = json.loads(raw)  # type: ignore[arg-type]
        return str(entry[2])
    except (TypeError, ValueError, IndexError, KeyError):
        return OTHER


class BacklogCollector(Collector):
    """The gauges an autoscaler reads; ``queues`` are the queues the workers consume."""

    def __init__(self, client: redis.Redis, queues: Sequence[str]) -> None:
        self._redis = client
        self._queues = list(queues)
        self._first_seen = register(client, "backlog_first_seen")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        backlog = read_backlog(self._redis, self._queues, self._first_seen)
        waiting = GaugeMetricFamily(
            "refgen_queue_messages_waiting",
            "Messages waiting on the queue, every priority level summed",
            labels=["queue"],
        )
        unacked = GaugeMetricFamily(
            "refgen_queue_messages_unacked",
            "Messages workers hold unacknowledged: running, reserved, retries counting down",
            labels=["queue"],
        )
        oldest = GaugeMetricFamily(
            "refgen_queue_oldest_message_age_seconds",
            "How long the oldest message waiting on the queue has waited (0: none waits)",
            labels=["queue"],
        )
        for queue, figures in backlog.queues.items():
            waiting.add_metric([queue], figures.waiting)
            unacked.add_metric([queue], figures.unacked)
            oldest.add_metric([queue], round(max(0.0, figures.oldest_age_s), 3))
        yield waiting
        yield unacked
        yield oldest
