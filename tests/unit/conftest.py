"""Unit tests get a redis-server of their own: the integration tests' session worker stays up
until the session ends, and its watchdog would claim the leases and deadlines these tests
expire on purpose."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tasks.localredis import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server
