"""Fixtures shared by every test: a private redis-server and sample plans."""

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
