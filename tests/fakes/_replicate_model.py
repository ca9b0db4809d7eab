"""Prediction state machine and JSON shapes used by :mod:`.replicate_server`."""

from __future__ import annotations

import hashlib
import io
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from http import HTTPStatus
from typing import Any, Literal

from PIL import Image

from ._http import Response, json_response

SDXL_MODEL = "stability-ai/sdxl"
SDXL_VERSION = "39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b"
NSFW_ERROR = "NSFW content detected. Try running it again, or try a different prompt."
INVALID_VERSION_TITLE = "Invalid version or not permitted"
INVALID_VERSION_DETAIL = (
    "The specified version does not exist (or perhaps you don't have permission to use it?)"
)
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
_TITLES = {401: "Unauthenticated", 404: "Not found", 422: "Unprocessable Entity"}


@lru_cache(maxsize=8)
def make_png(width: int = 1024, height: int = 1024) -> bytes:
    """A real RGB PNG of the given size (cached)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (64, 96, 160)).save(buf, format="PNG")
    return buf.getvalue()


def problem(status: int, detail: str, title: str | None = None) -> Response:
    """RFC 7807 problem details, the shape ``ReplicateError.from_response`` parses."""
    if title is None:
        known = status in HTTPStatus._value2member_map_
        title = _TITLES.get(status) or (HTTPStatus(status).phrase if known else "Error")
    return json_response(status, {"title": title, "detail": detail, "status": status})


def throttled(retry_after: int) -> Response:
    """Replicate's 429: the body its rate-limit docs show (``detail`` only), and ``Retry-After``
    in whole seconds."""
    detail = f"Request was throttled. Your rate limit resets in ~{retry_after}s."
    return json_response(429, {"detail": detail}, {"Retry-After": str(retry_after)})


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_cancel_after(raw: str) -> float | None:
    """Seconds from a ``Cancel-After`` value such as ``1m``, ``90s`` or ``1m30s`` (Go-style
    durations, as the changelog's ``1m`` example suggests); None when it is not one."""
    text = raw.strip()
    if not text or _DURATION.sub("", text):
        return None
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(text))


@dataclass
class TokenBucket:
    """One rate limit: ``per_minute`` sustained, bursts of ``burst_s`` seconds' worth (at least
    one request). Stricter than Replicate, which allows "short bursts above" its limits."""

    per_minute: float
    burst_s: float = 1.0
    tokens: float = -1.0
    updated: float = 0.0

    @property
    def capacity(self) -> float:
        return max(1.0, self.per_minute / 60 * self.burst_s)

    def take(self, now: float) -> float:
        """0 when a request is admitted; otherwise seconds until one would be."""
        rate = self.per_minute / 60
        if self.tokens < 0:
            self.tokens = self.capacity
        else:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / rate


@dataclass(frozen=True)
class PredictionPlan:
    """How one prediction evolves.  Times are wall-clock seconds after creation."""

    outcome: Literal["succeeded", "failed", "hang"] = "succeeded"
    duration: float = 0.3  # when it becomes terminal ("hang": stays "processing" forever)
    starting_for: float | None = None  # length of the "starting" phase; default duration / 3
    predict_time: float | None = 2.5  # None -> metrics carries no predict_time
    error: str = NSFW_ERROR  # used when outcome == "failed"
    image_bytes: bytes | None = None  # overrides the server-wide output file bytes
    # Only a create whose prompt contains this text takes the plan; others pass it by.
    prompt_contains: str | None = None

    def applies_to(self, model_input: dict[str, Any]) -> bool:
        return self.prompt_contains is None or self.prompt_contains in str(
            model_input.get("prompt", "")
        )


@dataclass(frozen=True)
class CreateCall:
    """One prediction successfully created (faulted/rejected creates are not listed)."""

    prediction_id: str
    path: str  # request path, e.g. /v1/predictions
    version_field: str | None  # body["version"] exactly as sent
    model: str
    version: str
    input: dict[str, Any]
    prefer: str | None  # Prefer header, if any
    timestamp: float  # time.monotonic() of the request
    cancel_after: str | None = None  # Cancel-After header, if any


@dataclass
class Prediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    plan: PredictionPlan
    created: float  # time.monotonic()
    created_at: datetime
    canceled_after: float | None = None  # an explicit cancel, seconds after creation
    deadline: float | None = None  # Cancel-After, seconds after creation

    @property
    def _start(self) -> float:
        plan = self.plan
        default_start = plan.duration / 3 if plan.starting_for is None else plan.starting_for
        return min(default_start, plan.duration)

    def _end(self) -> tuple[float, str] | None:
        """When and how it ends, if nothing else happens: its plan, its deadline (``aborted``
        before the run started, ``canceled`` once running) or an explicit cancel."""
        ends: list[tuple[float, str]] = []
        if self.plan.outcome != "hang":
            ends.append((self.plan.duration, self.plan.outcome))
        if self.deadline is not None:
            ends.append((self.deadline, "aborted" if self.deadline <= self._start else "canceled"))
        if self.canceled_after is not None:
            ends.append((self.canceled_after, "canceled"))
        return min(ends, key=lambda end: end[0]) if ends else None

    def state(self) -> tuple[str, float | None, float | None]:
        """(status, started offset, completed offset), offsets in seconds after creation."""
        elapsed, start, end = time.monotonic() - self.created, self._start, self._end()
        if end is not None and elapsed >= end[0]:
            at, status = end
            never_ran = status == "aborted" or (status == "canceled" and at <= start)
            return status, (None if never_ran else start), at
        if elapsed < start:
            return "starting", None, None
        return "processing", start, None

    @property
    def status(self) -> str:
        return self.state()[0]

    def next_change_in(self) -> float | None:
        """Seconds until its status next changes by itself (None: never, e.g. a hang)."""
        elapsed = time.monotonic() - self.created
        end = self._end()
        times = [self._start] + ([end[0]] if end is not None else [])
        later = [t - elapsed for t in times if t > elapsed]
        return min(later) if later else None

    def run_time(self) -> float:
        """Seconds it has run (processing), so far or in all."""
        _, started, completed = self.state()
        if started is None:
            return 0.0
        until = completed if completed is not None else time.monotonic() - self.created
        return round(max(0.0, until - started), 6)

    def billed_seconds(self) -> float:
        """What Replicate bills: ``predict_time`` for a finished run, the time run for a
        cancelled one (a deadline or an explicit cancel), nothing for an aborted one."""
        status = self.status
        if status in ("succeeded", "failed") and self.plan.predict_time is not None:
            return self.plan.predict_time
        return self.run_time()

    def cancel(self) -> None:
        if self.status not in TERMINAL:
            self.canceled_after = time.monotonic() - self.created

    def output_names(self) -> list[str]:
        try:
            count = max(1, min(int(self.input.get("num_outputs", 1)), 4))
        except (TypeError, ValueError):
            count = 1
        return [f"{self.id}{'' if i == 0 else f'-{i}'}.png" for i in range(count)]

    def to_json(self, base_url: str) -> dict[str, Any]:
        status, started, completed = self.state()
        seed = int(hashlib.sha256(self.id.encode()).hexdigest()[:6], 16)
        logs = ""
        if started is not None:
            logs = f"Using seed: {seed}\nPrompt: {self.input.get('prompt', '')}\ntxt2img mode\n"
        metrics: dict[str, Any] = {}
        if status in ("succeeded", "failed"):
            logs += "100%|##########| 50/50 [00:02<00:00, 20.0it/s]\n"
            if self.plan.predict_time is not None:
                metrics["predict_time"] = self.plan.predict_time
            metrics["total_time"] = round(self.plan.duration, 6)
        elif status == "canceled" and started is not None:
            # A run cut short is billed for the time it ran, and says so.
            metrics["predict_time"] = self.run_time()
            metrics["total_time"] = round(completed or 0.0, 6)
        elif status == "processing":
            logs += " 40%|####      | 20/50 [00:01<00:01, 20.0it/s]\n"
        urls = f"{base_url}/v1/predictions/{self.id}"
        outputs = [f"{base_url}/files/{name}" for name in self.output_names()]
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "logs": logs,
            "output": outputs if status == "succeeded" else None,
            "data_removed": False,
            "error": self.plan.error if status == "failed" else None,
            "status": status,
            "created_at": _iso(self.created_at, 0.0),
            "started_at": _iso(self.created_at, started),
            "completed_at": _iso(self.created_at, completed),
            "urls": {"get": urls, "cancel": f"{urls}/cancel", "web": f"{base_url}/p/{self.id}"},
            "metrics": metrics,
        }


def _iso(base: datetime, offset: float | None) -> str | None:
    if offset is None:
        return None
    stamp = (base + timedelta(seconds=offset)).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")
