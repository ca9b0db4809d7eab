"""structlog over the stdlib, so our lines and Celery's share handlers, with secrets redacted
from every line whoever wrote it."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime

import structlog

from worker.settings import Settings

# Tokens that look like credentials even when they are not ours (a pasted key in a plan).
_TOKEN_SHAPES = re.compile(
    r"r8_[A-Za-z0-9]{8,}|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"
)
# A signed link's signature or token is its credential: whoever reads the link can fetch the
# image for two weeks. Celery logs every task's return value, and images' links are in them.
_LINK_CREDENTIALS = re.compile(r"(?i)([?&](?:signature|token)=)[^&\s'\"\\]+")
REDACTED = "[redacted]"


class Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _LINK_CREDENTIALS.sub(rf"\1{REDACTED}", text)
        return _TOKEN_SHAPES.sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message; installed on handlers, so it sees every logger."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self._redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks can quote a request's headers; keep the type, drop the text.
            record.exc_text = self._redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class WithoutTraceback(logging.Filter):
    """Keeps a record's one-line message and drops its traceback: for a library's lines about
    an expected condition (Celery's "Failed operation _store_result. Retrying 29 more times."
    while Redis restarts or fails over)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self._prefix):
            record.exc_info, record.exc_text = None, None
        return True


class JsonLines(logging.Formatter):
    """``LOG_FORMAT=json``: one JSON object per line, whoever logged. Our lines are JSON already
    (structlog rendered them) and pass as they are; a library's (Celery's own lines, its
    task lines, kombu's) become an object with the same keys as ours."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        # The redaction filter has rendered a traceback to exc_text by now (and dropped
        # exc_info); a handler without it may still hold exc_info.
        exception = record.exc_text or (
            self.formatException(record.exc_info) if record.exc_info else None
        )
        if message.startswith("{"):
            with contextlib.suppress(ValueError):
                ours = json.loads(message)
                if isinstance(ours, dict):
                    if exception is None:
                        return message
                    return json.dumps({**ours, "exception": exception})
        line = {
            "event": message,
            "level": record.levelname.lower(),
            "logger": record.name,
            # As structlog's TimeStamper(fmt="iso", utc=True) writes ours.
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
        }
        if exception is not None:
            line["exception"] = exception
        return json.dumps(line)


def renderer(settings: Settings) -> structlog.typing.Processor:
    """How a line is written: JSON for log shippers, key=value for people."""
    if settings.log_format == "json":
        return structlog.processors.JSONRenderer()
    return structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=False)


def configure_logging(settings: Settings) -> None:
    """Idempotent: safe to call from each worker process and from the CLI."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer(settings),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(settings.log_level.upper())
        ),
        cache_logger_on_first_use=True,
    )
    # httpx logs every request at INFO: a line per Replicate poll and upload is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    retries = logging.getLogger("celery.backends.base")
    if not any(isinstance(f, WithoutTraceback) for f in retries.filters):
        retries.addFilter(WithoutTraceback("Failed operation"))
    install_redaction(settings, map(logging.getLogger, OWN_HANDLERS))
    format_as_json(settings)


# Loggers that Celery gives handlers of their own, which do not propagate to the root's: its
# task loggers' (set up after the root's, ``after_setup_task_logger``) and billiard's (prefork).
OWN_HANDLERS = ("celery.task", "multiprocessing")


def format_as_json(settings: Settings) -> None:
    """With ``LOG_FORMAT=json``, every handler Celery set up writes JSON lines: its formatter
    prefixes each line with its own format (``[date: INFO/MainProcess]``), which a log shipper
    cannot parse."""
    if settings.log_format != "json":
        return
    for logger in (logging.getLogger(), *map(logging.getLogger, OWN_HANDLERS)):
        for handler in logger.handlers:
            handler.setFormatter(JsonLines())


def install_redaction(settings: Settings, loggers: Iterable[logging.Logger] = ()) -> None:
    redactor = Redactor(settings.secret_values())
    targets = [logging.getLogger(), *loggers]
    for logger in targets:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter(redactor))
