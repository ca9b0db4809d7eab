"""Real services for integration tests: the session's redis-server, real ``refgen worker``
processes, and a bare Celery client that knows nothing of the project."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import pytest
from celery import Celery

from tasks.harness import JobRunner, WorkerProcess, bare_client, base_worker_env
from tasks.localredis import RedisServer
from tests.integration import crash_scenarios
from tests.integration.background import Background, asked_for
from tests.integration.campaign import Report, run_scenario
from tests.integration.provider_limit import AtTheLimit, run_at_the_limit
from tests.integration.wheel import Installed, build_and_install

# Image ids the shared worker treats specially (LOCAL_GENERATOR_* knobs).
DOOMED = ("doomed_alley", "doomed_pier")  # fail every attempt, retryably
FLAKY = "flaky_street"  # fails its first attempt only
REJECTED = "rejected_scene"  # content filter: permanent, never retried


@pytest.fixture(scope="session")
def storage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def worker_env(redis_server: RedisServer, storage_dir: Path) -> dict[str, str]:
    env = base_worker_env(redis_server.url, storage_dir)
    env.update(
        GENERATOR_BACKEND="local",
        STORAGE_BACKEND="local",
        LOCAL_GENERATOR_LATENCY_S="0.2",
        LOCAL_GENERATOR_FAIL_IDS=",".join(DOOMED),
        LOCAL_GENERATOR_FLAKY_IDS=FLAKY,
        LOCAL_GENERATOR_REJECT_IDS=REJECTED,
    )
    return env


@pytest.fixture(scope="session")
def client(redis_server: RedisServer) -> Celery:
    return bare_client(redis_server.url)


@pytest.fixture(scope="session")
def worker(
    worker_env: dict[str, str], client: Celery, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    process = WorkerProcess(worker_env, tmp_path_factory.mktemp("logs") / "worker.log", "shared")
    process.start(client)
    yield process
    process.stop()


@pytest.fixture
def run_job(redis_server: RedisServer) -> JobRunner:
    return JobRunner(redis_server.url)


# --- Slow scenarios that mostly wait: started with the session, run beside the other tests --


@pytest.fixture(scope="session")
def background() -> Iterator[Background]:
    pool = Background()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def campaign(
    request: pytest.FixtureRequest,
    background: Background,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Future[Report]]:
    built = crash_scenarios.scenarios(tmp_path_factory)
    wanted = asked_for(request, "tests.integration.test_crash_points", built)
    return {
        name: background.submit(partial(run_scenario, name, body))
        for name, body in built.items()
        if name in wanted
    }


@pytest.fixture(scope="session")
def provider_limit(
    background: Background, tmp_path_factory: pytest.TempPathFactory
) -> Future[AtTheLimit]:
    return background.submit(partial(run_at_the_limit, tmp_path_factory.mktemp("limit")))


@pytest.fixture(scope="session")
def installed_wheel(
    background: Background, tmp_path_factory: pytest.TempPathFactory
) -> Future[Installed]:
    return background.submit(partial(build_and_install, tmp_path_factory.mktemp("wheel")))


@pytest.fixture(scope="session", autouse=True)
def _slow_scenarios_start_first(request: pytest.FixtureRequest) -> None:
    modules = {getattr(item, "module", None) for item in request.session.items}
    names = {m.__name__ for m in modules if m is not None}
    if "tests.integration.test_crash_points" in names:
        request.getfixturevalue("campaign")
    if "tests.integration.test_replicate_load" in names:
        request.getfixturevalue("provider_limit")
    if "tests.integration.test_wheel" in names:
        request.getfixturevalue("installed_wheel")
