"""Managed Redis as the cloud services offer it: TLS, an ACL user with a password, and nothing
on the plain port. A real ``redis-server`` with certificates the test makes (its own CA), and
every process refgen has reaching it by one ``rediss://`` URL: the worker, ``refgen run`` and
the gateway."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from celery import Celery

from tasks.harness import WorkerProcess, bare_client, base_worker_env
from tasks.localredis import free_port
from tests.integration.gatewaykit import Sse, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]
USER = "refgen"


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1: (ca, cert, key)."""
    ca_key, ca, key, csr, cert = (
        folder / name for name in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=refgen test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, cert, key


@pytest.fixture(scope="module")
def managed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """A TLS-only redis-server with an ACL user: (its rediss:// URL, the password, the CA)."""
    assert shutil.which("openssl"), "openssl is required (Debian: apt-get install openssl)"
    folder = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certificates(folder)
    port, password = free_port(), "pw-" + secrets.token_hex(12)
    # fmt: off
    server = subprocess.Popen(
        [
            "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(folder),
            "--user", "default", "off",
            "--user", USER, "on", f">{password}", "~*", "&*", "+@all",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # fmt: on
    url = f"rediss://{USER}:{password}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                server.poll()
                assert server.returncode is None, "redis-server with TLS did not start"
                time.sleep(0.05)
        yield url, password, ca
    finally:
        server.kill()
        server.wait()


def test_every_process_reaches_a_tls_redis_with_an_acl_user(
    managed, tmp_path: Path, load_plan
) -> None:
    url, password, _ = managed
    env = base_worker_env(url, tmp_path / "storage")
    env.update(GENERATOR_BACKEND="local", STORAGE_BACKEND="local", LOCAL_GENERATOR_LATENCY_S="0.1")
    plain = url.split("?")[0].replace("rediss://", "redis://", 1)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plain, socket_connect_timeout=1).ping()  # no plain-text port

    worker = WorkerProcess(env, tmp_path / "worker.log", "tls").start(bare_tls_client(url))
    try:
        plan = tmp_path / "plan.json"
        job = load_plan("typical_2x2")
        plan.write_text(json.dumps(job))
        run_env = {**os.environ, "REDIS_URL": url}
        done = subprocess.run(
            [sys.executable, "-m", "tasks.cli", "run", str(plan), "--duration-seconds", "180"],
            env=run_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["job_id"] == job["job_id"] and result["status"] == "success"

        with running_gateway(env, tmp_path / "gateway.log", free_port()) as gateway:
            assert httpx.get(f"{gateway}/healthz").status_code == 200
            sse = Sse()
            events = f"{gateway}/jobs/{job['job_id']}/events"
            with httpx.stream("GET", events, timeout=30) as response:
                sse.read(response)
            final = sse.messages[-1]
            assert final["event_type"] == "stage_update"
            assert final["data"]["status"] == "completed"
    finally:
        worker.stop()
    logs = (tmp_path / "worker.log").read_text() + (tmp_path / "gateway.log").read_text()
    for text in (logs, done.stdout, done.stderr):
        assert password not in text
    assert "Traceback" not in logs


def bare_tls_client(url: str) -> Celery:
    """An upstream Celery client of a TLS Redis: the URL, and the CA its certificate needs."""
    base, _, query = url.partition("?")
    ca = query.split("ssl_ca_certs=", 1)[1]
    app = bare_client(base)
    tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca}
    app.conf.broker_use_ssl = tls
    app.conf.redis_backend_use_ssl = tls
    return app
