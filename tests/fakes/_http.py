"""Shared plumbing for the fake HTTP servers in this package (standard library only).

:class:`FakeHTTPServer` runs a :class:`http.server.ThreadingHTTPServer` on a background
thread, records every request it receives, and consumes scripted :class:`Fault` objects
from per-route-kind FIFO queues before a request reaches its real handler.

Fault handling order for each request: the request is recorded, its route kind is
resolved (``"unknown"`` when no route matches), a subclass may refuse it outright
(``_admit``: Replicate's rate limits), then the first queued fault for that kind
is popped (falling back to the wildcard queue ``"*"``).  A fault may sleep (``delay``),
then either drop the connection without answering (``disconnect``), answer with its own
``status``/``body``/``headers``, or -- when ``status`` is ``None`` -- let the request be
handled normally after the delay.  Faults are therefore applied *before* authentication.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from re import Match, Pattern
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

JSONValue = Any


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received by a fake (``path`` is raw, still percent-encoded)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # keys lower-cased
    body: bytes
    timestamp: float  # time.monotonic() when the request was read
    route: str  # route kind, e.g. "create", "upload", or "unknown"
    client_port: int = 0  # the connection's, on the client's side: one per connection

    def json(self) -> JSONValue:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True)
class Fault:
    """A scripted misbehaviour for the next request of a route kind.

    ``status=None`` means "no canned answer": after ``delay`` the request is handled
    normally.  ``body=None`` with a status asks the server for its realistic default error
    body for that status; a ``dict``/``list`` body is sent as JSON, ``bytes``/``str`` as
    text/html (set ``Content-Type`` in ``headers`` to override).  ``disconnect=True`` closes
    the socket without any response (the client sees ``httpx.RemoteProtocolError``).
    """

    status: int | None = None
    body: bytes | str | Mapping[str, Any] | list[Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    disconnect: bool = False
    # Only requests whose body contains this text take the fault (e.g. one image's prompt);
    # others pass it by and it stays queued.
    only_if_body_contains: str | None = None
    # The request is handled (a create makes, runs and bills its prediction) and its answer is
    # lost on the way back: after ``delay`` the client gets ``status`` (an edge's HTML 502) or,
    # with ``disconnect``, a closed connection, whatever the handler answered or still holds.
    lost_answer: bool = False

    def applies_to(self, body: bytes) -> bool:
        needle = self.only_if_body_contains
        return needle is None or needle.encode() in body


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(
    status: int, obj: JSONValue, headers: Mapping[str, str] | None = None
) -> Response:
    hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
    return Response(status, json.dumps(obj).encode(), hdrs)


Handler = Callable[[RecordedRequest, Match[str]], Response]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: Pattern[str]
    kind: str
    handler: Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeHTTPServer


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes: without TCP_NODELAY, Nagle's algorithm holds the
    # body until the client's delayed ACK, 40 ms on Linux, on every reused connection. Real
    # servers set it; a fake that did not would add latency that is not the worker's.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.fake._track(self.connection, add=False)
        super().finish()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        self.server.fake._dispatch(self, self._read_body())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch


class FakeHTTPServer:
    """Base class: lifecycle, request log and fault queues.  Subclasses add routes."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host, self._port = host, port
        self._lock = threading.RLock()
        self._requests: list[RecordedRequest] = []
        self._faults: dict[str, deque[Fault]] = {}
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.handler_errors: list[str] = []  # tracebacks of bugs inside the fake (-> 500)
        self._routes: list[Route] = []

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self._host, self._port), _RequestHandler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- recording
    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_for(
        self, route: str | None = None, method: str | None = None
    ) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if (route is None or r.route == route) and (method is None or r.method == method)
        ]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # ---------------------------------------------------------------- faults
    def inject(self, route: str, fault: Fault, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` requests of route kind ``route`` ("*" = any)."""
        with self._lock:
            self._faults.setdefault(route, deque()).extend([fault] * times)

    def pending_faults(self, route: str) -> int:
        with self._lock:
            return len(self._faults.get(route, ()))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _pop_fault(self, route: str, body: bytes = b"") -> Fault | None:
        with self._lock:
            for kind in (route, "*"):
                queue = self._faults.get(kind) or deque()
                for index, fault in enumerate(queue):
                    if fault.applies_to(body):
                        del queue[index]
                        return fault
        return None

    def _default_fault_response(self, status: int) -> Response:
        return json_response(status, {"message": f"fault {status}"})

    def _fault_response(self, fault: Fault) -> Response:
        assert fault.status is not None
        if fault.body is None:
            resp = self._default_fault_response(fault.status)
        elif isinstance(fault.body, bytes | str):
            body = fault.body.encode() if isinstance(fault.body, str) else fault.body
            resp = Response(fault.status, body, {"Content-Type": "text/html; charset=utf-8"})
        else:
            resp = json_response(fault.status, fault.body)
        resp.headers.update(fault.headers)
        return resp

    # ---------------------------------------------------------------- dispatch
    def _not_found(self, req: RecordedRequest) -> Response:
        return json_response(404, {"detail": "Not found."})

    def _admit(self, req: RecordedRequest) -> Response | None:
        """A server-wide refusal before faults and handlers (e.g. a rate limit); None admits."""
        return None

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def _dispatch(self, h: _RequestHandler, body: bytes) -> None:
        split = urlsplit(h.path)
        route, match, handler = "unknown", None, None
        for candidate in self._routes:
            if candidate.method == h.command and (m := candidate.pattern.fullmatch(split.path)):
                route, match, handler = candidate.kind, m, candidate.handler
                break
        req = RecordedRequest(
            method=h.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in h.headers.items()},
            body=body,
            timestamp=time.monotonic(),
            route=route,
            client_port=h.client_address[1],
        )
        with self._lock:
            self._requests.append(req)
        refused = self._admit(req)
        if refused is not None:
            self._send(h, refused)
            return
        fault = self._pop_fault(route, body)
        if fault is not None and fault.lost_answer:
            self._lose_answer(h, fault, req, match, handler)
            return
        if fault is not None:
            if fault.delay:
                self._sleep(fault.delay)
            if fault.disconnect:
                h.close_connection = True
                return
            if fault.status is not None:
                self._send(h, self._fault_response(fault))
                return
        try:
            resp = handler(req, match) if handler and match else self._not_found(req)
        except Exception:
            self.handler_errors.append(traceback.format_exc())
            resp = json_response(500, {"detail": "fake server bug", "status": 500})
        self._send(h, resp)

    def _lose_answer(
        self,
        h: _RequestHandler,
        fault: Fault,
        req: RecordedRequest,
        match: Match[str] | None,
        handler: Handler | None,
    ) -> None:
        """Do the request's work in the background, as the upstream behind an edge would, and
        answer for the edge: its error (or a closed connection) after ``fault.delay``."""
        if handler is not None and match is not None:
            work = threading.Thread(target=handler, args=(req, match), daemon=True)
            work.start()
            work.join(timeout=max(fault.delay, 0.05))  # at least long enough to have begun
        else:
            self._sleep(fault.delay)
        if fault.disconnect or fault.status is None:
            h.close_connection = True
            return
        self._send(h, self._fault_response(fault))

    def _send(self, h: _RequestHandler, resp: Response) -> None:
        if self._stopping.is_set():
            h.close_connection = True
            return
        try:
            h.send_response(resp.status)
            for name, value in resp.headers.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(resp.body)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(resp.body)
        except OSError:  # client went away (e.g. its read timeout fired during a delay)
            h.close_connection = True
