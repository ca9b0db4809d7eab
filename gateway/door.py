"""The gateway's door under abuse (README: Scaling the gateway).

- A connection must deliver a request's headers within ``GATEWAY_HEADER_TIMEOUT_S`` (from its
  start, or from the end of its previous response): slowloris clients trickling header bytes
  are closed, not held. uvicorn's keep-alive timeout closes idle connections between requests.
- Out of file descriptors (``EMFILE``), asyncio stops accepting for a second and reports it;
  here that report is answered: one spare descriptor, kept open for the purpose, is freed to
  accept the waiting connections one by one and answer each 503 with ``Retry-After``, and the
  episode is logged once (then at most once a minute, with a count), without a traceback.
- A request that carries both ``Content-Length`` and ``Transfer-Encoding`` is answered 400
  and its connection closed (RFC 9112 §6.1). h11 frames it by the second; a proxy in front
  that frames it by the first would pass what h11 reads as a second request (smuggling).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import time
from typing import Any

import structlog
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

log = structlog.get_logger("gateway.door")

_OUT_OF = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_MESSAGE = "socket.accept() out of system resource"
_LOG_EVERY_S = 60.0
_SHED_AT_ONCE = 256


def refusal_bytes(detail: str, retry_after_s: int) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"retry-after: {retry_after_s}\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


_OUT_OF_FDS = refusal_bytes("the gateway is out of connections; retry later", 10)


class RefuseAmbiguousFraming:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {name for name, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                # "Connection: close" makes h11, and so uvicorn, close after this answer:
                # whatever follows on the connection is never read as a request.
                refusal = JSONResponse(
                    {"detail": "a request may not carry both Content-Length and Transfer-Encoding"},
                    status_code=400,
                    headers={"Connection": "close"},
                )
                await refusal(scope, receive, send)
                return
        await self._app(scope, receive, send)


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for a request's headers."""

    class HeaderTimeoutProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def __init__(
            self,
            config: Config,
            server_state: ServerState,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request is in: its headers came in time

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return HeaderTimeoutProtocol


class OutOfDescriptors:
    """The event loop's exception handler for accepts that fail for want of descriptors."""

    def __init__(self) -> None:
        self._spare: int | None = None
        self._reported_at: float | None = None
        self._refused_since_report = 0
        self._take_spare()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        previous = loop.get_exception_handler()

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            listener = context.get("socket")
            if (
                context.get("message") == _ACCEPT_MESSAGE
                and isinstance(exc, OSError)
                and exc.errno in _OUT_OF
                and listener is not None
            ):
                self.shed(listener.fileno(), exc)
            elif _retry_after_close(context):
                pass  # asyncio's accept retry, due after the server closed its socket at exit
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handle)

    def shed(self, listener_fd: int, exc: OSError) -> None:
        """Answer the connections waiting on the listening socket with 503, one at a time on
        the spare descriptor."""
        refused = 0
        listener = socket.socket(fileno=listener_fd)  # the server's socket, not a new one
        self._drop_spare()
        try:
            for _ in range(_SHED_AT_ONCE):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    break  # nothing waiting, or still out of descriptors
                with conn:  # closed before the next accept: one descriptor is enough
                    conn.setblocking(False)
                    # Read what request there is: closing on it unread would reset it.
                    with contextlib.suppress(OSError):
                        conn.recv(65536)
                    with contextlib.suppress(OSError):
                        conn.send(_OUT_OF_FDS)
                refused += 1
        finally:
            listener.detach()
            self._take_spare()
        self._report(exc, refused)

    def _report(self, exc: OSError, refused: int) -> None:
        self._refused_since_report += refused
        now = time.monotonic()
        if self._reported_at is not None and now - self._reported_at < _LOG_EVERY_S:
            return
        self._reported_at = now
        log.warning(
            "out_of_file_descriptors",
            error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            answered_503=self._refused_since_report,
            action="new connections are answered 503 until streams close; raise the fd "
            "limit (ulimit -n) or lower GATEWAY_MAX_STREAMS",
        )
        self._refused_since_report = 0

    def _take_spare(self) -> None:
        if self._spare is None:
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self._spare = None  # taken again at the next episode

    def _drop_spare(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None


def _retry_after_close(context: dict[str, Any]) -> bool:
    handle = context.get("handle")
    callback = getattr(handle, "_callback", None)
    return getattr(callback, "__name__", "") == "_start_serving" and isinstance(
        context.get("exception"), ValueError | OSError
    )
