"""Runs the gateway under uvicorn, with the project's logging: a start-up line that says
where it listens, one access-log line per request (``gateway.access``), and uvicorn's own
lines in the same format (JSON with ``LOG_FORMAT=json``)."""

from __future__ import annotations

import logging
import socket
import sys

import structlog
import uvicorn

from gateway.app import create_app
from worker.logging import configure_logging, install_redaction, renderer
from worker.settings import Settings

log = structlog.get_logger("gateway")


class _Server(uvicorn.Server):
    """uvicorn's server, announcing its address once it is bound (a failed bind exits)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
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
    if not settings.gateway_requires_tokens():  # raises for production without a secret
        # Said at every start: anyone who reaches this port sees every job.
        # Info, not warning: development without tokens is the expected case (make demo).
        log.info(
            "gateway_without_tokens",
            reason="GATEWAY_AUTH=off" if settings.gateway_auth == "off" else "development",
            fix="set GATEWAY_JWT_SECRET (README: Security)",
        )
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        # Our access log (gateway.access) leaves out query strings, which hold signatures.
        access_log=False,
        log_level="warning",
    )
    _Server(config).run()
