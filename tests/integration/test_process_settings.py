"""Secrets only where they are used: each process started in production with nothing but its own
settings. The worker needs the generator's and the store's credentials and refuses to start
without them; beat, Flower, the gateway and `refgen run` need Redis alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import httpx
import pytest

from tasks import exit_codes
from tasks.harness import bare_client, stop_process_group
from tasks.localredis import free_port
from tests.integration.gatewaykit import SECRETS, as_operator, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]


def production(redis_url: str, home: Path, **more: str) -> dict[str, str]:
    """A production environment holding only what is named here: no inherited variable."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "ENVIRONMENT": "production",
        "REDIS_URL": redis_url,
        **more,
    }


def refgen(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("secrets", "says"),
    [
        ({}, "REPLICATE_API_TOKEN is required for the replicate generator in production"),
        (
            {"REPLICATE_API_TOKEN": "r8_made_up_for_this_test_0123456789"},
            "SUPABASE_URL and SUPABASE_SERVICE_KEY are required for the supabase store in "
            "production",
        ),
        (
            {
                "REPLICATE_API_TOKEN": "changeme",
                "SUPABASE_URL": "http://127.0.0.1:9",
                "SUPABASE_SERVICE_KEY": "your-service-key",
            },
            "looks like a placeholder",
        ),
    ],
)
def test_the_worker_refuses_to_start_without_its_credentials(
    redis_server, tmp_path, secrets: dict[str, str], says: str
) -> None:
    done = refgen("worker", env=production(redis_server.url, tmp_path, **secrets))
    assert done.returncode == exit_codes.CONFIGURATION, done.stderr
    [line] = done.stderr.splitlines()  # one clear line, no traceback
    assert line.startswith("refgen: configuration error: ") and says in line
    for secret in secrets.values():
        assert secret not in done.stderr + done.stdout
    assert done.stdout == ""  # it never started a worker: no banner, nothing else


def test_run_gateway_beat_and_flower_work_in_production_with_redis_alone(
    worker, redis_server, load_plan, tmp_path
) -> None:
    env = production(
        redis_server.url,
        tmp_path,
        LOG_FORMAT="json",
        GATEWAY_JWT_SECRET=SECRETS,
        FLOWER_BASIC_AUTH="ops:test-only-flower-pw",
    )
    plan = load_plan("minimal_1x1")
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))

    # `refgen run` sends the job and reads its result (the session's worker makes it).
    done = refgen("run", str(plan_path), env=env)
    assert done.returncode == exit_codes.RESULT, done.stderr
    assert json.loads(done.stdout)["status"] == "success"

    # The gateway serves the job's page, its events and the index (to an operator's token).
    with running_gateway(env, tmp_path / "gateway.log", free_port()) as url:
        http = httpx.Client(headers=as_operator())
        assert http.get(f"{url}/healthz").json() == {"ok": True}
        assert http.get(f"{url}/jobs/{plan['job_id']}").status_code == 200
        assert plan["job_id"] in http.get(f"{url}/").text
        with http.stream("GET", f"{url}/jobs/{plan['job_id']}/events", timeout=30) as reply:
            body = "".join(reply.iter_text())
        assert '"result_status":"success"' in body

    # Beat runs its schedule and answers pings; Flower answers its healthcheck.
    beat_name = f"celerybeat-{uuid.uuid4().hex[:6]}@localhost"
    flower_port = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("beat", "flower")}
    commands = {
        "beat": [
            sys.executable,
            "-m",
            "tasks.cli",
            "beat",
            "--schedule",
            str(tmp_path / "celerybeat-schedule"),
            "--enable-remote-control",
            "--hostname",
            beat_name,
        ],
        "flower": [
            sys.executable,
            "-m",
            "tasks.cli",
            "flower",
            f"--port={flower_port}",
            "--address=127.0.0.1",
        ],
    }
    processes = {}
    try:
        for name, argv in commands.items():
            with logs[name].open("ab") as log:
                processes[name] = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        client = bare_client(redis_server.url)
        deadline = time.monotonic() + 60
        beat_answers = flower_answers = False
        while not (beat_answers and flower_answers):
            for name, process in processes.items():
                assert process.poll() is None, f"{name} exited: {logs[name].read_text()[-2000:]}"
            assert time.monotonic() < deadline, {n: p.read_text()[-1500:] for n, p in logs.items()}
            beat_answers = beat_answers or bool(
                client.control.ping(destination=[beat_name], timeout=0.5)
            )
            try:
                url = f"http://127.0.0.1:{flower_port}/healthcheck"
                with urllib.request.urlopen(url, timeout=2) as reply:
                    flower_answers = reply.read() == b"OK"
            except OSError:
                time.sleep(0.2)
    finally:
        for process in processes.values():
            stop_process_group(process)
    for name, path in logs.items():
        assert "Traceback" not in path.read_text(), name


def test_a_worker_started_with_celery_itself_refuses_too(redis_server, tmp_path) -> None:
    """`celery -A tasks.app worker`, not `refgen worker`: the same check, at worker start."""
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "--loglevel", "INFO"],
        env=production(redis_server.url, tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == exit_codes.CONFIGURATION, done.stderr[-2000:]
    output = done.stderr + done.stdout
    assert "worker_refused_to_start" in output
    assert "REPLICATE_API_TOKEN is required" in output
    assert "Traceback" not in output
    assert "ready." not in output  # it never took a task


def test_a_mistyped_redis_url_never_prints_its_password(tmp_path) -> None:
    """`REDIS_URL` with a letter O in its port: every process refuses it in one line, with
    the password masked (celery's own start-up too, where pydantic's error is a traceback)."""
    env = production(
        "redis://:test-only-redis-pw@127.0.0.1:63O79/0",
        tmp_path,
        GATEWAY_JWT_SECRET=SECRETS,
        FLOWER_BASIC_AUTH="ops:test-only-flower-pw",
    )
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    commands = {
        "run": [sys.executable, "-m", "tasks.cli", "run", str(plan)],
        "worker": [sys.executable, "-m", "tasks.cli", "worker"],
        "beat": [sys.executable, "-m", "tasks.cli", "beat"],
        "gateway": [sys.executable, "-m", "tasks.cli", "gateway", f"--port={free_port()}"],
        "flower": [sys.executable, "-m", "tasks.cli", "flower", f"--port={free_port()}"],
        "celery flower": [sys.executable, "-m", "celery", "-A", "tasks.app", "flower"],
    }
    processes = {
        name: subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, argv in commands.items()
    }
    for name, process in processes.items():
        output, _ = process.communicate(timeout=60)
        assert process.returncode != 0, name
        assert "63O79" in output, (name, output[-1000:])  # it says what is wrong
        assert "test-only-redis-pw" not in output, name
        if name != "celery flower":
            assert process.returncode == exit_codes.CONFIGURATION, (name, output[-1000:])
            assert "Traceback" not in output, name
