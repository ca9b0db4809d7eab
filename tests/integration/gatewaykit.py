"""What the gateway's tests share: a real ``refgen gateway`` process, an SSE reader that reads
the way a browser does, and Debian's Chromium under Playwright."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import redis

from gateway.auth import mint
from worker.events import EventPublisher, ImageCompleted, ImageStarted, StageFinished, StageStarted
from worker.job_index import JobIndex

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# The test gateways' token secrets (GATEWAY_JWT_SECRET="new,old"): 32 characters each.
SECRET = "test-only-gateway-secret-0123456"
OLD_SECRET = "test-only-previous-secret-012345"
SECRETS = f"{SECRET},{OLD_SECRET}"


def job_token(job_id: str, *, ttl_s: float = 600, secret: str = SECRET) -> str:
    return mint(secret, job_id=job_id, ttl_s=ttl_s)


def operator_token(*, ttl_s: float = 600, secret: str = SECRET) -> str:
    return mint(secret, operator=True, ttl_s=ttl_s)


def as_operator() -> dict[str, str]:
    """Headers that open every route of a gateway with ``GATEWAY_JWT_SECRET=SECRETS``."""
    return {"Authorization": f"Bearer {operator_token()}"}


@dataclass
class Sse:
    """One Server-Sent Events connection, read the way a browser reads it."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (id, message)
    arrived: list[float] = field(default_factory=list)  # monotonic time of each event
    comments: int = 0
    ended: bool = False

    def read(self, response: httpx.Response, stop_after: int | None = None) -> None:
        event_id, data = "", []
        for line in response.iter_lines():
            if line.startswith(":"):
                self.comments += 1
            elif line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                self.events.append((event_id, json.loads("\n".join(data))))
                self.arrived.append(time.monotonic())
                data = []
                if stop_after is not None and len(self.events) >= stop_after:
                    return
        self.ended = True

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [m for _, m in self.events]

    @property
    def longest_quiet_s(self) -> float:
        gaps = [b - a for a, b in zip(self.arrived, self.arrived[1:], strict=False)]
        return max(gaps, default=0.0)


@contextlib.contextmanager
def running_gateway(
    env: dict[str, str],
    log_path: Path,
    port: int,
    *,
    refgen: list[str] | None = None,
    cwd: Path = ROOT,
) -> Iterator[str]:
    """``refgen gateway`` on ``port``, ready (``/healthz`` answers), stopped afterwards;
    ``refgen`` is another installation's command (an installed wheel's)."""
    url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*(refgen or [sys.executable, "-m", "tasks.cli"]), "gateway", "--port", str(port)],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                httpx.get(f"{url}/healthz")
                break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def publish_one_image_job(client: redis.Redis, job_id: str, image_url: str) -> None:
    """A finished one-image job's events, as a worker publishes them (no worker needed)."""
    events = EventPublisher(client, JobIndex(client))
    events.publish(job_id, StageStarted(total_images=1))
    events.publish(
        job_id,
        ImageStarted(image_type="scene", image_id="forest", current_image=1, total_images=1),
    )
    events.publish(
        job_id,
        ImageCompleted(
            image_type="scene",
            image_id="forest",
            image_url=image_url,
            generation_time=1.0,
            cost=Decimal("0.005"),
            retry_count=0,
            completed_images=1,
            total_images=1,
        ),
    )
    events.publish(
        job_id,
        StageFinished(
            status="completed",
            total_images=1,
            successful_images=1,
            failed_images=0,
            total_cost=Decimal("0.005"),
            total_time=1.0,
            result_status="success",
        ),
    )


def wait_known(url: str, job_id: str, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/jobs/{job_id}", headers=headers).status_code == 404:
        assert time.monotonic() < deadline, "the gateway never learned of the job"
        time.sleep(0.05)


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The gateway's log (LOG_FORMAT=json): every line must be one JSON object."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is required (CI installs it)"
    return found
