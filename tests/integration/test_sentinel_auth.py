"""Sentinels with a password of their own, and Redis servers with another: every process of a
deployment (worker, ``refgen run``, the gateway, beat, Flower) and a bare upstream client reach
the primary through them. A process that dropped ``REDIS_SENTINEL_PASSWORD`` from its Sentinel
connections could not even find the primary (``MasterNotFoundError``)."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import httpx
import pytest

from tasks import exit_codes
from tasks.harness import WorkerProcess, bare_client, local_worker_env, stop_process_group
from tasks.localredis import free_port
from tests.integration.gatewaykit import running_gateway
from tests.integration.sentinel import MASTER, SentinelCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]
FLOWER_USER = "ops"


def flower_workers(port: int, password: str) -> dict[str, object]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers?refresh=1")
    token = base64.b64encode(f"{FLOWER_USER}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            answer: dict[str, object] = json.loads(reply.read())
            return answer
    except (OSError, ValueError):
        return {}


def test_every_process_reaches_redis_through_sentinels_with_a_password(
    load_plan, tmp_path: Path
) -> None:
    redis_password = "pw-" + secrets.token_hex(8)
    sentinel_password = "spw-" + secrets.token_hex(8)
    flower_password = "fpw-" + secrets.token_hex(8)
    with SentinelCluster(password=redis_password, sentinel_password=sentinel_password) as cluster:
        # REDIS_URL names a server that is not there: Sentinel must win over it.
        env = local_worker_env("redis://127.0.0.1:1/0", tmp_path / "storage")
        env.update(
            cluster.env(),
            FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{flower_password}",
            FLOWER_UNAUTHENTICATED_API="false",
        )
        client = bare_client(
            cluster.celery_url, sentinel_master=MASTER, sentinel_password=sentinel_password
        )
        worker = WorkerProcess(env, tmp_path / "worker.log", "sentinel-auth")
        beat_name = f"celerybeat-{uuid.uuid4().hex[:6]}@localhost"
        flower_port = free_port()
        commands = {
            "beat": [
                *("-m", "tasks.cli", "beat", "--schedule", str(tmp_path / "schedule")),
                *("--enable-remote-control", "--hostname", beat_name),
            ],
            "flower": [
                *("-m", "celery", "-A", "tasks.app", "flower"),
                *(f"--port={flower_port}", "--address=127.0.0.1"),
            ],
        }
        others: dict[str, subprocess.Popen[bytes]] = {}
        try:
            worker.start(client)
            for name, argv in commands.items():
                with (tmp_path / f"{name}.log").open("ab") as log:
                    others[name] = subprocess.Popen(
                        [sys.executable, *argv],
                        env=env,
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
            plan = load_plan("minimal_1x1")
            (tmp_path / "plan.json").write_text(json.dumps(plan))
            done = subprocess.run(
                [sys.executable, "-m", "tasks.cli", "run", str(tmp_path / "plan.json")],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == exit_codes.RESULT, done.stderr[-3000:]
            assert json.loads(done.stdout)["status"] == "success"
            assert client.AsyncResult(plan["job_id"]).get(timeout=30)["status"] == "success"

            with running_gateway(env, tmp_path / "gateway.log", free_port()) as url:
                assert httpx.get(f"{url}/healthz").json() == {"ok": True}
                assert httpx.get(f"{url}/jobs/{plan['job_id']}").status_code == 200

            deadline = time.monotonic() + 60
            beat_answered = flower_sees_worker = False
            while not (beat_answered and flower_sees_worker):
                for name, process in others.items():
                    log = (tmp_path / f"{name}.log").read_text()[-2000:]
                    assert process.poll() is None, f"{name} exited: {log}"
                assert time.monotonic() < deadline, {
                    name: (tmp_path / f"{name}.log").read_text()[-1500:] for name in others
                }
                beat_answered = beat_answered or bool(
                    client.control.ping(destination=[beat_name], timeout=0.5)
                )
                flower_sees_worker = worker.hostname in flower_workers(flower_port, flower_password)
                time.sleep(0.2)
        finally:
            for process in others.values():
                stop_process_group(process)
            worker.stop()
    logs = {path.name: path.read_text() for path in tmp_path.glob("*.log")}
    for name, text in logs.items():
        assert "Traceback" not in text, (name, text[-3000:])
        for secret in (redis_password, sentinel_password, flower_password):
            assert secret not in text, name
    assert not any(secret in done.stderr for secret in (redis_password, sentinel_password))
