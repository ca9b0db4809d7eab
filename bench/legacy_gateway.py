"""The gateway's event route as it was before the shared reader (kept for ``bench/gateway.py``
only): each stream its own ``XREAD BLOCK`` on a connection from a pool of 100
(``gateway.stream.JobEventStream``), sse-starlette's response, no caps.

``python -m bench.legacy_gateway PORT`` with ``REDIS_URL`` set.
"""

from __future__ import annotations

import sys

import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.stream import JobEventStream, stream_client
from worker.settings import Settings


def legacy_app(settings: Settings) -> Starlette:
    streams = stream_client(settings.redis_endpoint())

    async def events(request: Request) -> Response:
        last_id = request.headers.get("last-event-id")
        stream = JobEventStream(streams, request.path_params["job_id"], last_id)
        return EventSourceResponse(stream.events(), ping=settings.gateway_keepalive_s)

    async def healthz(_: Request) -> Response:
        return Response("ok")

    return Starlette(routes=[Route("/healthz", healthz), Route("/jobs/{job_id}/events", events)])


def main() -> None:
    settings = Settings()
    uvicorn.run(
        legacy_app(settings),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="critical",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
