"""What is deployed runs a job: the wheel, built from the tracked sources, installed in a fresh
venv with the pinned constraints, run from outside the source tree (``wheel.py``). The editable
install the rest of the suite uses reads every file from the work tree and cannot see a file
the package data leaves out (the Lua scripts once were: every job failed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from concurrent.futures import Future
from pathlib import Path

import httpx
import pytest

from tasks import exit_codes
from tasks.harness import WorkerProcess, bare_client, base_worker_env, local_worker_env
from tasks.localredis import RedisServer, free_port
from tests.integration.gatewaykit import running_gateway
from tests.integration.wheel import ROOT, Installed, tracked_sources

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def test_the_built_wheel_holds_every_file_the_processes_read(
    installed_wheel: Future[Installed],
) -> None:
    installed = installed_wheel.result()
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    needed = {
        path.relative_to(ROOT).as_posix()
        for folder in ("worker", "tasks", "gateway")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and path.suffix not in (".pyc",) and "__pycache__" not in path.parts
    }
    assert needed - names == set()


def test_the_installed_wheel_runs_a_job_outside_the_source_tree(
    installed_wheel: Future[Installed], tmp_path: Path
) -> None:
    installed = installed_wheel.result()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [
            installed.python,
            "-c",
            "import worker, tasks, gateway, redis.connection as c; "
            "print(worker.__file__); print(c.DefaultParser.__name__)",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    module, parser = where.stdout.split()
    assert Path(module).is_relative_to(installed.venv)  # not the work tree
    # The package's dependencies bring hiredis, and redis-py parses every reply with it.
    assert parser == "_HiredisParser"

    plan = json.loads((ROOT / "examples" / "plans" / "typical_2x2.json").read_text())
    (elsewhere / "plan.json").write_text(json.dumps(plan))
    with RedisServer() as broker:
        env = local_worker_env(broker.url, tmp_path / "storage")
        env.pop("PYTHONPATH", None)
        env["PATH"] = f"{installed.venv / 'bin'}{os.pathsep}{env['PATH']}"
        worker = WorkerProcess(
            env, tmp_path / "worker.log", "wheel", command=installed.refgen, cwd=elsewhere
        )
        worker.start(bare_client(broker.url))
        try:
            done = subprocess.run(
                [*installed.refgen, "run", "plan.json", "--job-id", "new", "--timeout", "120"],
                cwd=elsewhere,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            result = json.loads(done.stdout)
            assert result["status"] == "success" and len(result["scene_references"]) == 2
            with running_gateway(
                env, tmp_path / "gateway.log", free_port(), refgen=installed.refgen, cwd=elsewhere
            ) as url:
                page = httpx.get(f"{url}/jobs/{result['job_id']}")
                assert page.status_code == 200 and result["job_id"] in page.text
                assert httpx.get(f"{url}/").status_code == 200
        finally:
            worker.stop()
    assert "Traceback" not in (tmp_path / "worker.log").read_text()


@pytest.fixture
def broken_tree(tmp_path: Path) -> Path:
    """The sources without one Lua script and one page, imported first from their directory
    (``python -m`` puts the working directory ahead of the editable install)."""
    tree = tracked_sources(tmp_path / "broken")
    (tree / "worker" / "lua" / "publish.lua").unlink()
    (tree / "gateway" / "job.html").unlink()
    return tree


@pytest.mark.parametrize(
    "command",
    [["-m", "tasks.cli", "worker"], ["-m", "celery", "-A", "tasks.app", "worker"]],
    ids=["refgen worker", "celery worker"],
)
def test_a_worker_missing_a_script_does_not_start(
    broken_tree: Path, redis_server, tmp_path: Path, command: list[str]
) -> None:
    env = local_worker_env(redis_server.url, tmp_path / "storage")
    done = subprocess.run(
        [sys.executable, *command, "--loglevel", "INFO"],
        cwd=broken_tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == exit_codes.CONFIGURATION, done.stderr[-3000:]
    output = (done.stderr + done.stdout).strip()
    assert "worker/lua/publish.lua is missing" in output
    assert "Traceback" not in output and "ready." not in output  # it never took a task
    if command[1] == "tasks.cli":
        [line] = output.splitlines()  # refgen worker: one line, before Celery says anything
        assert line.startswith("refgen: broken installation: ")


def test_a_gateway_missing_a_page_does_not_start(
    broken_tree: Path, redis_server, tmp_path: Path
) -> None:
    env = base_worker_env(redis_server.url, tmp_path / "storage")
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "gateway", "--port", str(free_port())],
        cwd=broken_tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == exit_codes.CONFIGURATION, done.stderr[-3000:]
    [line] = (done.stderr + done.stdout).strip().splitlines()
    assert line.startswith("refgen: broken installation: ") and "gateway/job.html" in line
