"""The gateway as an attacker meets it: a real ``refgen gateway`` in production, over a real
redis-server holding two jobs' events (published as a worker publishes them). Every door is
tried from outside: no token, another job's, an expired one, one signed with another secret,
``alg: none``; forged Host headers, stream ids Redis would refuse, 10 KB paths."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from gateway.auth import mint
from tasks.harness import base_worker_env
from tasks.localredis import RedisServer, free_port
from tests.integration.gatewaykit import (
    OLD_SECRET,
    ROOT,
    SECRETS,
    Sse,
    as_operator,
    job_token,
    log_lines,
    operator_token,
    publish_one_image_job,
    running_gateway,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
ANOTHER_SECRET = "not-this-gateways-secret-0123456"


@dataclass
class Door:
    url: str
    jobs: tuple[str, str]
    log: Path


@pytest.fixture(scope="module")
def door(tmp_path_factory) -> Iterator[Door]:
    tmp = tmp_path_factory.mktemp("door")
    with RedisServer() as broker:
        client = redis.Redis.from_url(broker.url)
        jobs = (str(uuid.uuid4()), str(uuid.uuid4()))
        for job in jobs:
            publish_one_image_job(client, job, f"https://storage.example/{job}/scene_forest.png")
        client.close()
        env = base_worker_env(broker.url, tmp / "storage")
        env.update(ENVIRONMENT="production", GATEWAY_JWT_SECRET=SECRETS)
        with running_gateway(env, tmp / "gateway.log", free_port()) as url:
            yield Door(url, jobs, tmp / "gateway.log")


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_without_the_right_token_neither_page_nor_stream_opens(door: Door) -> None:
    job, other = door.jobs
    now = int(time.time())
    wrong = {
        "no token": (None, 401),
        "another job's": (job_token(other), 403),
        "expired": (mint(SECRETS.split(",")[0], job_id=job, expires=now - 60), 401),
        "another secret's": (job_token(job, secret=ANOTHER_SECRET), 401),
        "alg none": (
            f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': job, 'exp': now + 60})}.",
            401,
        ),
        "garbage": ("garbage", 401),
    }
    for what, (token, status) in wrong.items():
        for path in (f"/jobs/{job}", f"/jobs/{job}/events"):
            by_header = {"Authorization": f"Bearer {token}"} if token else None
            by_query = {"token": token} if token else None
            for reply in (
                httpx.get(f"{door.url}{path}", headers=by_header),
                httpx.get(f"{door.url}{path}", params=by_query),
            ):
                assert reply.status_code == status, (what, path, reply.status_code)
                assert reply.headers["content-type"] == "application/json"
                assert job not in reply.text and "forest" not in reply.text
                if status == 401:
                    assert reply.headers["www-authenticate"].startswith("Bearer")
    # The index and /metrics: an operator's alone.
    for path in ("/", "/metrics"):
        assert httpx.get(f"{door.url}{path}").status_code == 401
        assert httpx.get(f"{door.url}{path}", params={"token": job_token(job)}).status_code == 403
    # Load balancers need no token.
    assert httpx.get(f"{door.url}/healthz").json() == {"ok": True}
    # The open prefixes lead to no job, dot segments or not (http.client sends them raw).
    host, port = door.url.removeprefix("http://").split(":")
    for raw in (
        f"/static/../jobs/{job}",
        f"/files/../jobs/{job}/events",
        f"/healthz/../jobs/{job}",
    ):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", raw)
        reply = connection.getresponse()
        body = reply.read()
        connection.close()
        assert reply.status in (401, 403, 404), (raw, reply.status)
        assert b"forest" not in body and b"stream-token" not in body


def test_a_forged_file_link_is_a_403_whatever_its_signature_holds(door: Door) -> None:
    """The image links need no token (their signature is the credential), so anyone can try
    one: a signature that is not ASCII once made the gateway answer 500."""
    job = door.jobs[0]
    for signature in ("%C3%A9", "%FF", "%00", "%F0%9F%98%80" * 20, "0" * 64, ""):
        reply = httpx.get(
            f"{door.url}/files/{job}/scene_forest.png?expires=9999999999&signature={signature}"
        )
        assert reply.status_code == 403, (signature, reply.status_code)
        assert reply.json() == {"detail": "the link is invalid or expired"}
    assert "Exception" not in door.log.read_text()


def test_the_jobs_token_opens_its_page_and_its_whole_replay(door: Door) -> None:
    job, other = door.jobs
    token = job_token(job)
    page = httpx.get(f"{door.url}/jobs/{job}", params={"token": token})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    # The page hands its stream a token for this job alone, expiring with the one it was given.
    stream_token = page.text.split('data-stream-token="')[1].split('"')[0]
    assert stream_token
    assert 'data-testid="all-jobs" hidden' in page.text  # the index is for operators
    with httpx.stream(
        "GET", f"{door.url}/jobs/{job}/events", params={"token": stream_token}, timeout=30
    ) as response:
        assert response.status_code == 200
        sse = Sse()
        sse.read(response)
    assert sse.ended and [m["event_type"] for m in sse.messages] == [
        "stage_update",
        "reference_generation_start",
        "reference_generation_complete",
        "stage_update",
    ]
    assert (
        httpx.get(f"{door.url}/jobs/{other}/events", params={"token": stream_token}).status_code
        == 403
    )
    # A token signed with the previous secret (a rotation under way) still opens it.
    old = job_token(job, secret=OLD_SECRET)
    assert (
        httpx.get(f"{door.url}/jobs/{job}", headers={"Authorization": f"Bearer {old}"}).status_code
        == 200
    )


def test_operators_see_the_index_every_job_and_metrics(door: Door) -> None:
    token = operator_token()
    operator = {"Authorization": f"Bearer {token}"}
    index = httpx.get(f"{door.url}/", headers=operator)
    assert index.status_code == 200
    for job in door.jobs:
        assert job in index.text
        assert httpx.get(f"{door.url}/jobs/{job}", headers=operator).status_code == 200
    # The index's links carry a token for their job, not the operator's.
    assert token not in index.text
    link = index.text.split(f'href="/jobs/{door.jobs[0]}?token=')[1].split('"')[0]
    assert httpx.get(f"{door.url}/jobs/{door.jobs[0]}", params={"token": link}).status_code == 200
    assert httpx.get(f"{door.url}/jobs/{door.jobs[1]}", params={"token": link}).status_code == 403
    assert httpx.get(f"{door.url}/metrics", params={"token": link}).status_code == 403
    metrics = httpx.get(f"{door.url}/metrics", headers=operator)
    assert metrics.status_code == 200 and "refgen_jobs_total" in metrics.text


def test_every_answer_carries_the_security_headers_and_no_inline_script(door: Door) -> None:
    job = door.jobs[0]
    for reply in (
        httpx.get(f"{door.url}/jobs/{job}", params={"token": job_token(job)}),
        httpx.get(f"{door.url}/", headers=as_operator()),
        httpx.get(f"{door.url}/jobs/{job}"),  # a refusal too
        httpx.get(f"{door.url}/healthz"),
    ):
        csp = reply.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["referrer-policy"] == "no-referrer"
    page = httpx.get(f"{door.url}/jobs/{job}", params={"token": job_token(job)}).text
    assert "<script>" not in page and "<style>" not in page and " style=" not in page
    script = httpx.get(f"{door.url}/static/job.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith(
        "text/javascript"
    )
    # No CORS by default: another origin's page cannot read an answer.
    reply = httpx.get(
        f"{door.url}/jobs/{job}/events",
        params={"token": job_token(job)},
        headers={"Origin": "https://evil.example"},
    )
    assert "access-control-allow-origin" not in reply.headers


def test_redirects_are_relative_whatever_the_host_header(door: Door) -> None:
    job = door.jobs[0]
    for path, location in (
        (f"/jobs/{job}/", f"/jobs/{job}"),
        ("//evil.example/", "/evil.example"),
        ("/jobs//evil.example//", "/jobs//evil.example"),
    ):
        reply = httpx.get(f"{door.url}{path}", headers={"Host": "evil.example"})
        assert reply.status_code == 307, path
        assert reply.headers["location"] == location
    assert httpx.get(f"{door.url}/\\evil.example/").status_code == 404


def test_stream_ids_redis_refuses_are_a_400_before_the_stream(door: Door) -> None:
    job = door.jobs[0]
    events = f"{door.url}/jobs/{job}/events"
    token = {"token": job_token(job)}
    for bad in ("99999999999999999999-0", f"0-{2**64}", "١٢٣-0", "１-0"):
        for reply in (
            httpx.get(events, params=token, headers={"Last-Event-ID": bad.encode()}),
            httpx.get(events, params={**token, "after": bad}),
        ):
            assert reply.status_code == 400, (bad, reply.status_code)
            assert "Last-Event-ID must be the id of an event" in reply.json()["detail"]
    time.sleep(0.2)  # the access-log line of the last reply
    assert "Exception in ASGI application" not in door.log.read_text()


def test_the_log_holds_no_token_and_no_long_path(door: Door) -> None:
    job = door.jobs[0]
    token = job_token(job)
    assert httpx.get(f"{door.url}/jobs/{job}", params={"token": token}).status_code == 200
    assert (
        httpx.get(
            f"{door.url}/jobs/{job}", headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 200
    )
    long_path = "/jobs/" + "a" * 10_000
    assert httpx.get(f"{door.url}{long_path}", headers=as_operator()).status_code == 400
    deadline = time.monotonic() + 10
    while not any(len(x.get("path", "")) > 200 for x in log_lines(door.log)):
        assert time.monotonic() < deadline, door.log.read_text()[-2000:]
        time.sleep(0.05)
    text = door.log.read_text()
    assert token not in text and "token=" not in text
    assert SECRETS.split(",")[0] not in text
    assert all(len(line) < 1000 for line in text.splitlines())


def exchange(url: str, raw: bytes) -> bytes:
    """Everything the gateway sends back on one connection for ``raw``, until it closes it
    (or goes quiet for a second, the connection still open)."""
    parts = urlsplit(url)
    received = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(raw)
        sock.settimeout(1)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def test_a_request_framed_two_ways_is_refused_and_nothing_behind_it_answered(door: Door) -> None:
    """Content-Length and Transfer-Encoding together: a proxy in front that reads the first
    and this gateway (h11) that reads the second disagree on where the request ends, and what
    one sees as a body the other runs as a request of its own (smuggling). RFC 9112 §6.1: the
    server must close the connection after answering; it is refused, 400, and closed."""
    job = door.jobs[0]
    smuggled = f"GET /jobs/{job}?token={job_token(job)} HTTP/1.1\r\nHost: gw\r\n\r\n"
    raw = (
        "GET /healthz HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled
    ).encode()
    answer = exchange(door.url, raw)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Content-Length and Transfer-Encoding" in answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # the smuggled request was never read
    # Either alone is no ambiguity: a chunked request is served, and so is the next one.
    chunked = "GET /healthz HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    answer = exchange(door.url, (chunked + "GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n").encode())
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer


def test_a_production_gateway_without_a_secret_does_not_start(tmp_path) -> None:
    env = base_worker_env("redis://127.0.0.1:1/0", tmp_path)
    env.update(ENVIRONMENT="production")
    env.pop("GATEWAY_JWT_SECRET", None)
    env.pop("GATEWAY_AUTH", None)
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "gateway", "--port", str(free_port())],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 5
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "GATEWAY_JWT_SECRET is required in production" in lines[0]
    assert "GATEWAY_AUTH=off" in lines[0]
