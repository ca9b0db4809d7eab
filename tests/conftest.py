"""Fixtures shared by every test: a private redis-server and sample plans; the tests that
collect a background scenario's outcome run last."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.localredis import RedisServer

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "examples" / "plans"

# Session fixtures whose scenarios start with the session and run beside the other tests
# (tests/integration/background.py).
_BACKGROUND = {"campaign", "provider_limit", "installed_wheel"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that wait for a background scenario's outcome go last, in their order: run
    where they were collected, the first of them held every test after it until the whole
    crash campaign had finished, where the others can run beside it."""
    items.sort(key=lambda item: bool(_BACKGROUND & set(getattr(item, "fixturenames", ()))))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def load_plan() -> Callable[..., dict[str, Any]]:
    """A sample plan with a fresh job id, so tests never share a job."""

    def _load(name: str = "typical_2x2", **changes: Any) -> dict[str, Any]:
        plan = json.loads((PLANS / f"{name}.json").read_text())
        plan = copy.deepcopy(plan)
        plan["job_id"] = str(uuid.uuid4())
        plan.update(changes)
        return plan

    return _load
