"""The gateway's routes.

- ``GET /``: recent jobs (status, images, cost, when), each linking to its page.
- ``GET /jobs/{id}``: a page that shows the job live.
- ``GET /jobs/{id}/events``: Server-Sent Events. A fresh client gets the job's history, then
  live events; each event's ``id`` is its Redis Stream id, so a client reconnecting with
  ``Last-Event-ID`` gets exactly what it missed. The stream ends after the final
  ``stage_update``. A job id that cannot be one, or a ``Last-Event-ID`` that is not a stream
  id: 400. Unknown job: 404.
- ``GET /files/{path}``: the local store's images, behind expiring signed links.
- ``GET /metrics``: Prometheus: per job (``worker.metrics``) and the broker's backlog
  (``worker.backlog``), and this process's streams (``gateway/stream_metrics.py``);
  ``GET /healthz``, which also fails when the stream reader is stuck or has lost Redis for
  longer than a stream's patience.
- ``GET /static/{name}``: the pages' scripts and styles (the CSP allows no inline ones).

Who may see what is ``gateway/auth.py`` (tokens, checked before routing); the headers on every
answer are ``gateway/headers.py``.

Streams share one reader per process (``gateway/fanout.py``, ``gateway/feed.py``) and are
capped, globally and per client, with 503 and ``Retry-After`` past the caps
(``gateway/limits.py``; README: Scaling the gateway).

With Redis away, every route that needs it answers 503 with a message (a page for a browser,
JSON otherwise) and logs one line, no traceback; an open event stream waits for Redis and
carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable

import redis
import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from gateway.access import AccessLog
from gateway.auth import RequireToken, Verifier, grant_of
from gateway.door import RefuseAmbiguousFraming
from gateway.fanout import Fanout
from gateway.feed import EventFeed, FeedOptions, FeedTimer
from gateway.headers import SecurityHeaders, origin_of
from gateway.limits import Refusal, StreamLimits, effective_cap
from gateway.pages import STATIC, escape, index_page, load_templates, template, unavailable_page
from gateway.stream import WITHOUT_CLIENT_SETINFO, is_stream_id, stream_client
from gateway.stream_metrics import StreamMetrics
from worker import constants as c
from worker.backlog import BacklogCollector
from worker.job_index import JobSummary
from worker.metrics import JobMetricsCollector
from worker.presence import WorkerPresenceCollector
from worker.redis_endpoint import RedisEndpoint
from worker.settings import Settings
from worker.storage.local import LocalImageStore

log = structlog.get_logger(__name__)

_JOB_ID = re.compile(c.ID_PATTERN)
_INDEX_ROWS = 100
# Requests other than streams: a Redis that does not answer is a quick 503, not a long wait.
_REQUEST_TIMEOUT_S = 3.0
# How long a new event stream waits for a Redis that is away (a failover takes seconds; a
# managed service's, up to half a minute) before it is answered 503.
_STREAM_PATIENCE_S = 30.0
# /healthz fails when the stream reader has not come round for this long (it does every
# second, or within its socket timeout when Redis stops answering).
_READER_STUCK_S = 20.0
# New streams looking their job up at once: a crowd arriving together waits its turn here
# rather than exhausting the request client's connections.
_LOOKUPS_AT_ONCE = 32


def _patient_while_redis_is_away() -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
        wait=wait_exponential(multiplier=0.1, min=0.1, max=2.0),
        stop=stop_after_delay(_STREAM_PATIENCE_S),
        reraise=True,
    )


def request_client(endpoint: RedisEndpoint) -> aioredis.Redis:
    return endpoint.async_client(
        decode_responses=True,
        socket_timeout=_REQUEST_TIMEOUT_S,
        socket_connect_timeout=_REQUEST_TIMEOUT_S,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        **WITHOUT_CLIENT_SETINFO,
    )


def metrics_client(endpoint: RedisEndpoint) -> redis.Redis:
    """The Prometheus collector is synchronous; it runs in a thread with this client."""
    return endpoint.client(
        decode_responses=True,
        socket_timeout=_REQUEST_TIMEOUT_S,
        socket_connect_timeout=_REQUEST_TIMEOUT_S,
        **WITHOUT_CLIENT_SETINFO,
    )


def metrics_registry(settings: Settings, client: redis.Redis) -> CollectorRegistry:
    """What ``/metrics`` serves: the jobs' figures, the broker's backlog and the workers'
    heartbeats, read from Redis at each scrape (``worker/metrics.py``, ``worker/backlog.py``,
    ``worker/presence.py``)."""
    registry = CollectorRegistry()
    registry.register(JobMetricsCollector(client))
    registry.register(BacklogCollector(client, settings.reference_gen_queues))
    registry.register(WorkerPresenceCollector(client))
    return registry


class Gateway:
    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        streams: aioredis.Redis,
        metrics_client: redis.Redis,
        verifier: Verifier | None = None,
        fd_limit: int | None = None,
    ) -> None:
        self._settings = settings
        self._verifier = verifier
        self._redis = client
        self._streams = streams
        self._store = LocalImageStore(settings.local_storage_dir, settings.storage_bucket)
        self._registry = metrics_registry(settings, metrics_client)
        # --- streams (README: Scaling the gateway) ---
        self._stream_metrics = StreamMetrics(self._registry)
        self.fanout = Fanout(
            streams,
            self._stream_metrics,
            queue_size=settings.gateway_viewer_queue,
            patience_s=_STREAM_PATIENCE_S,
        )
        cap = settings.gateway_max_streams
        self._limits = StreamLimits(
            cap if fd_limit is None else effective_cap(cap, fd_limit),
            settings.gateway_max_streams_per_client,
            self._stream_metrics,
        )
        self.feed_timer = FeedTimer(
            FeedOptions(
                keepalive_s=settings.gateway_keepalive_s,
                lifetime_s=settings.gateway_stream_lifetime_s,
                write_timeout_s=settings.gateway_write_timeout_s,
            )
        )
        self._lookups = asyncio.Semaphore(_LOOKUPS_AT_ONCE)

    async def _has_events(self, job_id: str) -> bool:
        return bool(await self._redis.exists(c.events_stream(job_id)))

    async def _events_expired(self, job_id: str) -> bool:
        """A finished job whose events are gone (a job starting has no events yet)."""
        if await self._has_events(job_id):
            return False
        finished = await self._redis.exists(c.JobKeys(job_id).result, f"celery-task-meta-{job_id}")
        return bool(finished)

    async def _known(self, job_id: str) -> bool:
        keys = c.JobKeys(job_id)
        found = await self._redis.exists(
            c.events_stream(job_id), keys.meta, keys.result, f"celery-task-meta-{job_id}"
        )
        return bool(found)

    def _job_token(self, request: Request) -> Callable[[str], str] | None:
        """Mints a token for one job, expiring with the request's own: what a page hands on
        (a link, its stream) instead of the token it was given. None when tokens are off."""
        grant = grant_of(request.scope)
        verifier = self._verifier
        if grant is None or verifier is None:
            return None
        return lambda job_id: verifier.mint_for_job(job_id, grant.expires)

    async def index(self, request: Request) -> Response:
        ids = [
            str(i)
            for i in await self._redis.zrevrange(c.JOB_INDEX, 0, _INDEX_ROWS - 1)
            if _JOB_ID.fullmatch(str(i))  # older versions indexed refused ids of any shape
        ]
        raws = await self._redis.hmget(c.JOB_INDEX_SUMMARIES, ids) if ids else []
        jobs = [
            summary
            for job_id, raw in zip(ids, raws, strict=True)
            if (summary := JobSummary.parse(job_id, None if raw is None else str(raw)))
        ]
        page = index_page(jobs, link_token=self._job_token(request))
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def events(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not _JOB_ID.fullmatch(job_id):
            return _bad_job_id(job_id)
        last_id = request.headers.get("last-event-id") or request.query_params.get("after")
        if last_id is not None and not is_stream_id(last_id):
            return JSONResponse(
                {
                    "detail": "Last-Event-ID must be the id of an event this gateway sent "
                    "(a stream id such as 1700000000000-0); leave it out to start from the "
                    "beginning"
                },
                status_code=400,
            )
        async with self._lookups:
            try:
                known, expired = await self._look_up(job_id)
            except (RedisConnectionError, RedisTimeoutError):
                # A stream opened while Redis fails over waits for it, as an open stream
                # would; a browser given a 503 here would stop following (EventSource gives
                # up on an error). Only then: the retrying's objects are garbage in cycles,
                # which the gateway leaves to its scheduled full collection (gateway/garbage.py).
                async for attempt in _patient_while_redis_is_away():
                    with attempt:
                        known, expired = await self._look_up(job_id)
        if not known:
            return JSONResponse({"detail": f"unknown job {job_id}"}, status_code=404)
        if expired:
            detail = (
                f"the events of job {job_id} have expired (they are kept "
                f"{c.EVENTS_STREAM_TTL_S // 3600} h after the job's last event); its result "
                "is still readable by job id"
            )
            return JSONResponse({"detail": detail}, status_code=404)
        return self._open_stream(request, job_id, last_id)

    async def _look_up(self, job_id: str) -> tuple[bool, bool]:
        """Whether the job is known, and whether its events have expired."""
        known = await self._known(job_id)
        return known, known and await self._events_expired(job_id)

    def _open_stream(self, request: Request, job_id: str, last_id: str | None) -> Response:
        """A stream slot, taken only now that the request is known good (and allowed); the
        feed releases it when the stream ends."""
        client = request.client.host if request.client else "unknown"
        slot = self._limits.admit(client)
        if isinstance(slot, Refusal):
            return JSONResponse(
                {"detail": slot.detail},
                status_code=503,
                headers={"Retry-After": str(slot.retry_after_s), "Cache-Control": "no-store"},
            )
        feed = EventFeed(
            self.fanout, self.feed_timer, self._streams, self._stream_metrics, job_id, last_id, slot
        )
        return _AsgiResponse(feed)

    async def page(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not _JOB_ID.fullmatch(job_id):
            return HTMLResponse(
                f"<h1>Not a job id</h1><p>{escape(job_id[:100])} cannot be a job id: ids are "
                "letters, digits, '-' and '_', at most 64 of them.</p>",
                status_code=400,
            )
        if not await self._known(job_id):
            return HTMLResponse(f"<h1>Unknown job</h1><p>{escape(job_id)}</p>", status_code=404)
        expired = await self._events_expired(job_id)
        minted = self._job_token(request)
        html = (
            template("job.html")
            .replace("{{EVENTS_EXPIRED}}", "true" if expired else "false")
            .replace("{{STREAM_TOKEN}}", escape(minted(job_id)) if minted else "")
            # With tokens, the index needs an operator's, which this page never holds.
            .replace("{{ALL_JOBS_HIDDEN}}", " hidden" if minted else "")
            .replace("{{JOB_ID}}", escape(job_id))
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(
            template(f"static/{name}"),
            media_type=STATIC[name],
            headers={"Cache-Control": "public, max-age=300"},
        )

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
        body = await run_in_threadpool(generate_latest, self._registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, _: Request) -> Response:
        try:
            await self._redis.ping()
        except redis.RedisError:
            return JSONResponse({"ok": False, "redis": "unreachable"}, status_code=503)
        trouble = self.fanout.trouble(_READER_STUCK_S)
        if trouble is not None:
            return JSONResponse({"ok": False, "streams": trouble}, status_code=503)
        return JSONResponse({"ok": True})


class _AsgiResponse(Response):
    """A response that is an ASGI app of its own (the event feed)."""

    def __init__(self, app: EventFeed) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def _bad_job_id(job_id: str) -> Response:
    return JSONResponse(
        {
            "detail": f"{job_id[:100]!r} cannot be a job id: ids are letters, digits, '-' and "
            "'_', at most 64 of them"
        },
        status_code=400,
    )


def _wants_html(request: Request) -> bool:
    path = request.url.path
    return path == "/" or (path.startswith("/jobs/") and not path.endswith("/events"))


async def _redis_unavailable(request: Request, exc: Exception) -> Response:
    """Redis down, restarting or not answering: an expected condition, said in one line."""
    log.warning("redis_unavailable", path=request.url.path, error=type(exc).__name__)
    message = "Redis is not answering; this retries by itself once it is back."
    if _wants_html(request):
        return HTMLResponse(unavailable_page(message), status_code=503)
    return JSONResponse({"detail": message}, status_code=503, headers={"Retry-After": "5"})


def create_app(
    settings: Settings,
    *,
    client: aioredis.Redis | None = None,
    streams: aioredis.Redis | None = None,
    sync_client: redis.Redis | None = None,
    fd_limit: int | None = None,
) -> Starlette:
    """The gateway's ASGI app; its Redis clients are built here unless handed in. Raises
    ``InstallationError`` when a page it serves is missing from the installation, and
    ``ConfigurationError`` for a production gateway without a token secret (fails closed).
    ``fd_limit``: the process's open-file limit, which lowers the cap on streams."""
    load_templates()
    verifier = (
        Verifier(settings.gateway_jwt_secrets) if settings.gateway_requires_tokens() else None
    )
    gateway = Gateway(
        settings,
        client or request_client(settings.redis_endpoint()),
        streams or stream_client(settings.redis_endpoint()),
        sync_client or metrics_client(settings.redis_endpoint()),
        verifier,
        fd_limit,
    )
    # Outermost first. Tokens are checked before routing: a refused request reaches no
    # handler, no Redis call and no stream slot. CORS answers preflights (which carry no token).
    middleware = [
        Middleware(AccessLog),
        Middleware(SecurityHeaders, image_origins=origin_of(settings.local_storage_public_url)),
        Middleware(RefuseAmbiguousFraming),
    ]
    if settings.gateway_allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.gateway_allowed_origins,
                allow_methods=["GET"],
                allow_headers=["Authorization", "Last-Event-ID"],
            )
        )
    if verifier is not None:
        middleware.append(Middleware(RequireToken, verifier=verifier))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        gateway.fanout.start()
        gateway.feed_timer.start()
        try:
            yield
        finally:
            await gateway.feed_timer.stop()
            await gateway.fanout.stop()

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", gateway.index),
            Route("/healthz", gateway.healthz),
            Route("/metrics", gateway.metrics),
            Route("/jobs/{job_id}", gateway.page),
            Route("/jobs/{job_id}/events", gateway.events),
            Route("/files/{path:path}", gateway.file),
            Route("/static/{name}", gateway.static),
        ],
        middleware=middleware,
        exception_handlers={
            redis.ConnectionError: _redis_unavailable,
            redis.TimeoutError: _redis_unavailable,
        },
    )
    # Its redirect would be built from the Host header: SecurityHeaders redirects instead.
    app.router.redirect_slashes = False
    app.state.fanout = gateway.fanout  # the server ends open streams with it at shutdown
    return app
