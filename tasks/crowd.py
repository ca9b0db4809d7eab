"""A crowd of SSE viewers in one asyncio process, for the gateway's crowd test and benchmark
(``tests/integration/test_gateway_crowd.py``, ``bench/gateway.py``).

Each viewer is a bare asyncio protocol (no HTTP client library: thousands of them must cost
little), reading the response the way a browser does: status, chunked body, SSE frames. It
keeps every event's id, and the delay from the ``published_at`` Redis stamped on the message
to its receipt here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from decimal import Decimal

from worker.events import StageFinished

_PUBLISHED_AT = '"published_at":'

# A job's final event, for crowds of jobs that make nothing but events.
FINISHED = StageFinished(
    status="completed",
    total_images=1,
    successful_images=1,
    failed_images=0,
    total_cost=Decimal("0.01"),
    total_time=1.0,
    result_status="success",
)


@dataclass
class Viewer(asyncio.Protocol):
    path: str
    extra_headers: str = ""  # "Name: value\r\n" lines
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    finals: int = 0
    ended: bool = False  # the response completed (the server ended the stream)
    closed: bool = False  # the connection is gone
    opened: asyncio.Future[None] | None = None
    _raw: bytes = b""
    _body: str = ""
    _chunked: bool = False
    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: crowd\r\nAccept: text/event-stream\r\n"
            f"{self.extra_headers}\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self._raw += data
        if self.status is None:
            head, found, rest = self._raw.partition(b"\r\n\r\n")
            if not found:
                return
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            self._chunked = self.headers.get("transfer-encoding") == "chunked"
            self._raw = rest
            if self.opened is not None and not self.opened.done():
                self.opened.set_result(None)
        if self._chunked:
            self._dechunk()
        else:
            self._body += self._raw.decode()
            self._raw = b""
        self._frames(now)

    @property
    def unread(self) -> str:
        """What the body holds past its last SSE frame (all of a response that is not one)."""
        return self._body

    def _dechunk(self) -> None:
        while True:
            size_line, found, rest = self._raw.partition(b"\r\n")
            if not found:
                return
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                return
            if size == 0:
                self.ended = True
                self._raw = b""
                return
            self._body += rest[:size].decode()
            self._raw = rest[size + 2 :]

    def _frames(self, now: float) -> None:
        *frames, self._body = self._body.split("\r\n\r\n")
        for frame in frames:
            event_id = ""
            for line in frame.split("\r\n"):
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: ") and event_id:
                    self.ids.append(event_id)
                    at = line.rfind(_PUBLISHED_AT)
                    if at >= 0:
                        self.delays.append(now - float(line[at + len(_PUBLISHED_AT) : -1]))
                    if '"status":"completed"' in line or '"status":"failed"' in line:
                        self.finals += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.opened is not None and not self.opened.done():
            self.opened.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_viewers(
    host: str,
    port: int,
    paths: list[str],
    *,
    at_once: int = 200,
    timeout_s: float = 60,
    source: str | None = None,
    headers: str = "",
) -> list[Viewer]:
    """One viewer per path, opened ``at_once`` at a time; each has its status (or is closed)
    when this returns. ``source``: the local address to connect from (another loopback
    address is another client); ``headers``: extra request header lines."""
    loop = asyncio.get_running_loop()
    viewers = [Viewer(path, headers) for path in paths]
    local = (source, 0) if source else None

    async def one(viewer: Viewer) -> None:
        viewer.opened = loop.create_future()
        try:
            await loop.create_connection(lambda: viewer, host, port, local_addr=local)
        except OSError:
            viewer.closed = True
            return
        await viewer.opened

    for first in range(0, len(viewers), at_once):
        batch = viewers[first : first + at_once]
        await asyncio.wait_for(asyncio.gather(*(one(v) for v in batch)), timeout_s)
    return viewers
