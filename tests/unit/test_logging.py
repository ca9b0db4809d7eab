"""Log lines for expected conditions carry no traceback, and no line carries a credential."""

from __future__ import annotations

import json
import logging

import pytest

from worker.logging import (
    OWN_HANDLERS,
    REDACTED,
    JsonLines,
    RedactingFilter,
    Redactor,
    configure_logging,
    format_as_json,
)
from worker.settings import Settings


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept() -> logging.Handler:
    configure_logging(Settings())
    handler = Kept()
    logger = logging.getLogger("celery.backends.base")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_celerys_retried_result_writes_are_one_line(kept: Kept) -> None:
    logger = logging.getLogger("celery.backends.base")
    try:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    except ConnectionError:
        logger.warning("Failed operation %s. Retrying %s more times.", "_store_result", 29,
                       exc_info=True)  # fmt: skip
        logger.error("Something else went wrong", exc_info=True)
    retried, other = kept.records
    assert retried.getMessage() == "Failed operation _store_result. Retrying 29 more times."
    assert retried.exc_info is None and not retried.exc_text
    # An unexpected error keeps its traceback (redaction may have rendered it to exc_text).
    assert other.exc_info is not None or "Traceback" in (other.exc_text or "")


def test_a_signed_links_credential_is_redacted_from_any_line_and_its_path_kept() -> None:
    """Celery logs each task's return value, and the images' links are in it: a link's
    signature (the local store) or token (Supabase) lets whoever reads the log fetch the
    image for two weeks."""
    local = "http://localhost:8000/files/j/scene_a.png?expires=1797507861&signature=9f86d081"
    supabase = "https://x.supabase.co/storage/v1/object/sign/b/j/scene_a.png?token=abc.def-ghi"
    result = {"image_url": local, "other": supabase}
    line = f"Task generate_reference[j:scene_a] succeeded in 2.01s: {result}"
    record = logging.LogRecord("celery.app.trace", logging.INFO, __file__, 1, line, None, None)
    RedactingFilter(Redactor([])).filter(record)
    message = record.getMessage()
    assert "9f86d081" not in message and "abc.def-ghi" not in message
    assert f"j/scene_a.png?expires=1797507861&signature={REDACTED}'" in message
    assert f"j/scene_a.png?token={REDACTED}'" in message


def test_json_lines_are_one_object_each_whoever_logged() -> None:
    """LOG_FORMAT=json: our structlog lines pass as they are, with a traceback the redaction
    filter rendered kept beside them; a library's lines get our keys."""
    ours = logging.LogRecord("worker", logging.ERROR, __file__, 1, '{"event": "x"}', None, None)
    assert JsonLines().format(ours) == '{"event": "x"}'
    ours.exc_text = "Traceback (most recent call last): ..."
    assert json.loads(JsonLines().format(ours)) == {"event": "x", "exception": ours.exc_text}
    celerys = logging.LogRecord(
        "celery.app.trace", logging.INFO, __file__, 1, "Task %s", ("t",), None
    )
    line = json.loads(JsonLines().format(celerys))
    assert line["event"] == "Task t" and line["level"] == "info"
    assert line["logger"] == "celery.app.trace" and line["timestamp"].endswith("Z")


def test_json_format_reaches_the_loggers_celery_gives_handlers_of_their_own() -> None:
    handlers = {name: logging.StreamHandler() for name in OWN_HANDLERS}
    for name, handler in handlers.items():
        logging.getLogger(name).addHandler(handler)
    try:
        format_as_json(Settings(log_format="json"))
        assert all(isinstance(h.formatter, JsonLines) for h in handlers.values())
    finally:
        for name, handler in handlers.items():
            logging.getLogger(name).removeHandler(handler)
