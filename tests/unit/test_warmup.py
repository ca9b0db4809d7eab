"""The warm-up a worker does at start (worker/warmup.py), on a real Redis."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import redis
from kombu import Connection
from redis.lock import Lock

from tasks.transport import Transport
from worker import scripts
from worker.services import Services
from worker.settings import Settings
from worker.storage.local import LocalImageStore
from worker.warmup import warm


@pytest.fixture
def services(redis_server, tmp_path: Path) -> Services:
    # A client of its own, so that the connections counted are the warm-up's.
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    return Services.build(
        Settings(generator_backend="local", storage_backend="local"),
        client=client,
        store=LocalImageStore(tmp_path),
    )


def test_warm_opens_the_slots_connections_and_caches_every_script(services: Services) -> None:
    services.client.script_flush()
    warm(services, connections=4)
    pool = services.client.connection_pool
    assert len(pool._available_connections) >= 6  # 4 slots, the lease keeper, the events
    sources = [scripts.source(n) for n in scripts.NAMES]
    sources += [Lock.LUA_RELEASE_SCRIPT, Lock.LUA_REACQUIRE_SCRIPT]  # the image locks' own
    shas = [hashlib.sha1(source.encode()).hexdigest() for source in sources]
    assert all(services.client.script_exists(*shas))


def test_a_failed_step_does_not_stop_the_worker(services: Services) -> None:
    services.client.connection_pool.connection_kwargs["port"] = 1  # nothing listens there
    services.client.connection_pool.disconnect()
    assert warm(services, connections=1) >= 0


def test_the_broker_channel_keeps_one_client_per_pool(redis_server) -> None:
    with Connection(redis_server.url, transport=Transport) as connection:
        channel = connection.channel()
        first = channel._create_client()
        assert channel._create_client() is first
        with channel.conn_or_acquire() as client:  # what a publish or an ack uses
            assert client is first and client.ping()
        channel._disconnect_pools()  # reconnected: a client on the new pool
        assert channel._create_client() is not first
        channel.close()
