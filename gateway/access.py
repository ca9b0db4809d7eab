"""One access-log line per request, through structlog (JSON with ``LOG_FORMAT=json``).

The line holds the path without its query string: signed links carry their signature there,
and tokens theirs (``?token=``), and a log is no place for a credential. A path longer than
``MAX_PATH_CHARS`` is cut, so a client cannot write 100 KB lines. A streamed response is
logged when it ends, so its duration is the stream's.
"""

from __future__ import annotations

import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("gateway.access")
MAX_PATH_CHARS = 256


def shown_path(path: str) -> str:
    if len(path) <= MAX_PATH_CHARS:
        return path
    return f"{path[:MAX_PATH_CHARS]}…(+{len(path) - MAX_PATH_CHARS} chars)"


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self._app(scope, receive, counting_send)
        finally:
            client = scope.get("client")
            log.info(
                "http_request",
                method=scope["method"],
                path=shown_path(scope["path"]),
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                bytes=sent,
                client=client[0] if client else None,
            )
