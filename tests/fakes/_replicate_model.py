"""Prediction state machine and JSON shapes used by :mod:`.replicate_server`."""

from __future__ import annotations

import hashlib
import io
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
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
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
    unit = "second" if retry_after == 1 else "seconds"
    detail = f"Request was throttled. Expected available in {retry_after} {unit}."
    resp = problem(429, detail, "Request was throttled")
    resp.headers["Retry-After"] = str(retry_after)
    return resp


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


@dataclass
class Prediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    plan: PredictionPlan
    created: float  # time.monotonic()
    created_at: datetime
    canceled_after: float | None = None

    def state(self) -> tuple[str, float | None, float | None]:
        """(status, started offset, completed offset), offsets in seconds after creation."""
        plan, elapsed = self.plan, time.monotonic() - self.created
        default_start = plan.duration / 3 if plan.starting_for is None else plan.starting_for
        start = min(default_start, plan.duration)
        if self.canceled_after is not None:
            started = start if self.canceled_after >= start else None
            return "canceled", started, self.canceled_after
        if elapsed < start:
            return "starting", None, None
        if plan.outcome == "hang" or elapsed < plan.duration:
            return "processing", start, None
        return plan.outcome, start, plan.duration

    @property
    def status(self) -> str:
        return self.state()[0]

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
        if status != "starting":
            logs = f"Using seed: {seed}\nPrompt: {self.input.get('prompt', '')}\ntxt2img mode\n"
        metrics: dict[str, Any] = {}
        if status in ("succeeded", "failed"):
            logs += "100%|##########| 50/50 [00:02<00:00, 20.0it/s]\n"
            if self.plan.predict_time is not None:
                metrics["predict_time"] = self.plan.predict_time
            metrics["total_time"] = round(self.plan.duration, 6)
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
