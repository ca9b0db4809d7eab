"""Which workers are alive, for the "workers without heartbeat" alert.

Each worker (its main process, named as Celery and Flower name it, ``refgen@host``) notes its
last beat in one sorted set on the Redis clock, every ``LEASE_TTL_S / 4``, and removes itself
when it stops cleanly; the gateway serves each worker's silence as
``refgen_worker_heartbeat_age_seconds{worker}``. A worker that died (SIGKILL, a lost machine)
stays, silent and ageing, for an hour, then is forgotten. Flower's ``flower_worker_online``
cannot serve here: it is set to 1 by each heartbeat and only a clean shutdown sets it to 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker import constants as c
from worker.scripts import register

FORGET_AFTER_S = 3600


class WorkerPresence:
    def __init__(self, client: redis.Redis, name: str) -> None:
        self._redis = client
        self.name = name
        self._beat = register(client, "worker_beat")

    def beat(self) -> None:
        self._beat(keys=[c.WORKERS_SEEN], args=[self.name, FORGET_AFTER_S])

    def gone(self) -> None:
        self._redis.zrem(c.WORKERS_SEEN, self.name)


class WorkerPresenceCollector(Collector):
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        pipe.zrange(c.WORKERS_SEEN, 0, -1, withscores=True)
        (seconds, micros), seen = pipe.execute()
        now = seconds + micros / 1_000_000
        ages = GaugeMetricFamily(
            "refgen_worker_heartbeat_age_seconds",
            "Seconds since the worker's last heartbeat (a live one beats every LEASE_TTL_S / 4)",
            labels=["worker"],
        )
        for name, last in seen:
            ages.add_metric([str(name)], round(max(0.0, now - float(last)), 3))
        yield ages
