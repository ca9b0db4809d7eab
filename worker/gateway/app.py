"""``refgen gateway``: an ASGI app over the job event streams.

- ``GET /jobs/{id}/events``: Server-Sent Events. A fresh client gets the job's history, then
  live events; each event's ``id`` is its Redis Stream id, so a client reconnecting with
  ``Last-Event-ID`` gets exactly what it missed. The stream ends after the final
  ``stage_update``. Unknown job: 404.
- ``GET /jobs/{id}``: a page that shows the job live.
- ``GET /files/{path}``: the local store's images, behind expiring signed links.
- ``GET /metrics``: Prometheus, per job (``worker.metrics``); ``GET /healthz``.

History and live events both come from the stream (``XRANGE`` then ``XREAD BLOCK``), so a
client sees one order; pub/sub on ``job_events:{id}`` is untouched for the existing gateway.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from worker import constants as c
from worker.metrics import JobMetricsCollector
from worker.settings import Settings
from worker.storage.local import LocalImageStore

_BLOCK_MS = 5_000
_READ_BATCH = 100


def is_final(message: dict[str, Any]) -> bool:
    return message.get("event_type") == c.EVENT_STAGE_UPDATE and message.get("data", {}).get(
        "status"
    ) in ("completed", "failed")


class Gateway:
    def __init__(
        self, settings: Settings, client: aioredis.Redis, sync_client: redis.Redis
    ) -> None:
        self._settings = settings
        self._redis = client
        self._store = LocalImageStore(settings.local_storage_dir, settings.storage_bucket)
        self._registry = CollectorRegistry()
        self._registry.register(JobMetricsCollector(sync_client))

    async def _known(self, job_id: str) -> bool:
        keys = c.JobKeys(job_id)
        found = await self._redis.exists(
            c.events_stream(job_id), keys.meta, keys.result, f"celery-task-meta-{job_id}"
        )
        return bool(found)

    async def events(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not await self._known(job_id):
            return JSONResponse({"detail": f"unknown job {job_id}"}, status_code=404)
        last_id = request.headers.get("last-event-id") or request.query_params.get("after")
        return EventSourceResponse(
            self._stream(job_id, last_id),
            ping=self._settings.gateway_keepalive_s,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _stream(self, job_id: str, last_id: str | None) -> AsyncIterator[ServerSentEvent]:
        stream = c.events_stream(job_id)
        cursor = last_id or "0-0"
        # History first: everything after the client's last id (exclusive), or everything;
        # then whatever comes next, until the final stage_update.
        history: Any = await self._redis.xrange(stream, min=f"({last_id}" if last_id else "-")
        entries = _entries(history)
        while True:
            for entry_id, fields in entries:
                cursor = entry_id
                event, final = _to_sse(entry_id, fields)
                yield event
                if final:
                    return
            batch: Any = await self._redis.xread(
                {stream: cursor}, count=_READ_BATCH, block=_BLOCK_MS
            )
            entries = [entry for _, found in batch or [] for entry in _entries(found)]

    async def page(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not await self._known(job_id):
            return HTMLResponse(f"<h1>Unknown job</h1><p>{_escape(job_id)}</p>", status_code=404)
        html = resources.files("worker.gateway").joinpath("job.html").read_text("utf-8")
        return HTMLResponse(html.replace("{{JOB_ID}}", _escape(job_id)))

    async def file(self, request: Request) -> Response:
        path = request.path_params["path"]
        try:
            expires = int(request.query_params["expires"])
            signature = request.query_params["signature"]
        except (KeyError, ValueError):
            return JSONResponse({"detail": "a signed link is required"}, status_code=403)
        if not self._store.verify(path, expires, signature):
            return JSONResponse({"detail": "the link is invalid or expired"}, status_code=403)
        try:
            if not self._store.exists(path):
                return JSONResponse({"detail": "no such image"}, status_code=404)
            target = self._store.bucket_dir / path
        except Exception:
            return JSONResponse({"detail": "no such image"}, status_code=404)
        return FileResponse(
            target, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    async def metrics(self, _: Request) -> Response:
        return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, _: Request) -> Response:
        try:
            await self._redis.ping()
        except aioredis.RedisError:
            return JSONResponse({"ok": False, "redis": "unreachable"}, status_code=503)
        return JSONResponse({"ok": True})


def _entries(raw: Any) -> list[tuple[str, dict[str, str]]]:
    """redis-py's wide stream types, narrowed (the client decodes responses)."""
    return [(str(i), {str(k): str(v) for k, v in (f or {}).items()}) for i, f in raw or []]


def _to_sse(entry_id: str, fields: dict[str, str]) -> tuple[ServerSentEvent, bool]:
    message = fields.get("message", "{}")
    return ServerSentEvent(data=message, id=entry_id), is_final(json.loads(message))


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def create_app(settings: Settings) -> Starlette:
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    sync_client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    gateway = Gateway(settings, client, sync_client)
    return Starlette(
        routes=[
            Route("/healthz", gateway.healthz),
            Route("/metrics", gateway.metrics),
            Route("/jobs/{job_id}", gateway.page),
            Route("/jobs/{job_id}/events", gateway.events),
            Route("/files/{path:path}", gateway.file),
        ]
    )
