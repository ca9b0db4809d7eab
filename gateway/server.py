"""Runs the gateway under uvicorn, with the project's logging: a start-up line that says
where it listens, one access-log line per request (``gateway.access``), and uvicorn's own
lines in the same format (JSON with ``LOG_FORMAT=json``).

For crowds (README: Scaling the gateway): the open-file limit is raised to its hard limit at
start (one descriptor per stream), connections must send their headers in time, and running
out of descriptors is answered 503 (``gateway/door.py``)."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from types import FrameType

import structlog
import uvicorn

from gateway.app import create_app
from gateway.door import OutOfDescriptors, header_timeout_protocol
from gateway.garbage import ScheduledCollection
from gateway.limits import effective_cap, raise_fd_limit
from worker.logging import configure_logging, install_redaction, renderer
from worker.settings import Settings

log = structlog.get_logger("gateway")


class _Server(uvicorn.Server):
    """uvicorn's server, announcing its address once it is bound (a failed bind exits)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Open streams would hold shutdown forever: they end now, and their browsers
        # reconnect with Last-Event-ID (to another gateway, or to this one restarted).
        super().handle_exit(sig, frame)
        self._on_exit()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        OutOfDescriptors().install(asyncio.get_running_loop())
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for bound in server.sockets or []:
                host, port = bound.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                log.info(
                    "gateway_listening",
                    url=f"http://{shown}:{port}",
                    index="/",
                    job_page="/jobs/<job_id>",
                    events="/jobs/<job_id>/events",
                )


def setup_logging(settings: Settings) -> None:
    level = settings.log_level.upper()
    ours = logging.StreamHandler(sys.stderr)
    ours.setFormatter(logging.Formatter("%(message)s"))  # structlog has rendered the line
    root = logging.getLogger()
    root.addHandler(ours)
    root.setLevel(level)
    # uvicorn's records are not structlog's: render them the same way, in one line each.
    foreign = logging.StreamHandler(sys.stderr)
    foreign.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer(settings),
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    uvicorn_loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error")]
    for logger in uvicorn_loggers:
        logger.handlers = [foreign]
        logger.propagate = False
    configure_logging(settings)
    install_redaction(settings, uvicorn_loggers)


def serve(settings: Settings, *, host: str, port: int) -> None:
    setup_logging(settings)
    fd_limit = raise_fd_limit()
    # First, as it refuses a broken installation or a production gateway without a token
    # secret: such a start says one line, nothing before it.
    app = create_app(settings, fd_limit=fd_limit)
    if not settings.gateway_requires_tokens():
        # Said at every start: anyone who reaches this port sees every job.
        # Info, not warning: development without tokens is the expected case (make demo).
        log.info(
            "gateway_without_tokens",
            reason="GATEWAY_AUTH=off" if settings.gateway_auth == "off" else "development",
            fix="set GATEWAY_JWT_SECRET (README: Security)",
        )
    cap = effective_cap(settings.gateway_max_streams, fd_limit)
    if cap < settings.gateway_max_streams:
        log.warning(
            "stream_cap_lowered",
            max_streams=cap,
            open_file_limit=fd_limit,
            action="raise the hard open-file limit (ulimit -Hn) to serve GATEWAY_MAX_STREAMS",
        )
    # Everything loaded so far lives as long as the process: out of the collector's full
    # passes, whose pauses grow with what they scan and delay every stream at once; and
    # those passes on a schedule, not whenever a crowd arrives.
    ScheduledCollection().start()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=header_timeout_protocol(settings.gateway_header_timeout_s),
        proxy_headers=bool(settings.forwarded_allow_ips.strip()),
        forwarded_allow_ips=settings.forwarded_allow_ips.strip() or None,
        # A crowd arriving at once waits in the kernel's queue rather than being turned away.
        backlog=4096,
        log_config=None,
        # Our access log (gateway.access) leaves out query strings, which hold signatures.
        access_log=False,
        log_level="warning",
    )
    _Server(config, on_exit=app.state.fanout.close).run()
