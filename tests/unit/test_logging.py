"""Log lines for expected conditions carry no traceback."""

from __future__ import annotations

import logging

import pytest

from worker.logging import configure_logging
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
