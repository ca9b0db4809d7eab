"""A test-only switch that makes a worker die, or fail, at one named point of its work.

For tests only. ``REFGEN_CRASH_AT=<point>`` makes the process SIGKILL its whole process group
when it reaches that point: the way a worker dies at an arbitrary instruction, landed exactly
where state is half-written. ``REFGEN_FAIL_AT=<point>`` raises there what production raises
at that point when the broker is gone (the caller names the type: kombu's
``OperationalError`` for a publish), and ``REFGEN_BUG_AT=<point>`` a ``RuntimeError``: an
unexpected fault (a bug),
not a condition the worker expects and rides out. With ``REFGEN_CRASH_FUSE=<file>`` the switch
fires once across every process that shares the file (the first to create it), so a standby
worker with the same environment carries on. ``REFGEN_HOLD_AT=<point>`` with
``REFGEN_HOLD_FILE=<file>`` stops the first process to reach the point there: it creates the
file and waits until the test removes it (at most two minutes), so a test can fail something
else (a Redis primary) at that exact instant. The variables are read once, at import; unset,
every call is one comparison with ``None``.

A crash lands where refgen's own state is half-written, not in the broker's open window (README:
Reliability): a message that kombu's ``BRPOP`` has taken off its queue but not yet recorded
among the unacknowledged, which a death there loses whatever refgen does. So before it kills,
the switch lets that settle: the worker's broker channels stop asking for messages, and a
``BRPOP`` already sent is read to its end (at most its one-second timeout). The killing thread
stays where it is, its state as the point left it.

The points, in the order a job meets them, are listed in ``POINTS`` (README: Reliability).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

POINTS = (
    "start.after_claim",
    "start.after_ledger_open",
    "start.after_plan_stored",
    "start.after_chord_sent",
    "image.after_reservation",
    "image.after_prediction_created",
    "image.after_charge",
    "image.after_upload",
    "image.after_outcome_recorded",
    "image.after_retry_handover",
    "image.after_retry_sent",
    "finalize.before_commit",
    "finalize.after_commit",
    "watchdog.after_claim",
    "watchdog.after_resend",
    "watchdog.resend",
)
# Where a message is published: REFGEN_FAIL_AT fails the publish there (once per attempt that
# the fuse lets through), REFGEN_HOLD_AT holds it (a test stops Redis meanwhile). Not crash
# points: the campaign's crashes at the points around them cover a death there.
PUBLISH_POINTS = (
    "publish.start_chord",
    "publish.image_retry",
    "publish.resend",
    "publish.result",
    "publish.callback",
)

_CRASH_AT = os.environ.get("REFGEN_CRASH_AT") or None
_FAIL_AT = os.environ.get("REFGEN_FAIL_AT") or None
_BUG_AT = os.environ.get("REFGEN_BUG_AT") or None
_FUSE = os.environ.get("REFGEN_CRASH_FUSE") or None
_HOLD_AT = os.environ.get("REFGEN_HOLD_AT") or None
_HOLD_FILE = os.environ.get("REFGEN_HOLD_FILE") or None
_HOLD_AT_MOST_S = 120.0


# What must settle before a crash point kills (tasks/transport.py: the broker channel stops
# taking messages, and the one it asked for is read first).
_BEFORE_CRASH: list[Callable[[], None]] = []


def before_crash(settle: Callable[[], None]) -> None:
    _BEFORE_CRASH.append(settle)


def crash_point(name: str) -> None:
    if _CRASH_AT is not None and name == _CRASH_AT and _light_fuse():
        for settle in _BEFORE_CRASH:
            settle()
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if _HOLD_AT is not None and name == _HOLD_AT and _HOLD_FILE is not None:
        _hold(_HOLD_FILE)
    if _BUG_AT is not None and name == _BUG_AT and _light_fuse():
        raise RuntimeError(f"injected fault at {name} (REFGEN_BUG_AT)")


def fail_point(name: str, *, error: Callable[[str], BaseException]) -> None:
    """``error``: the type production raises here (worker/ does not import kombu)."""
    if _FAIL_AT is not None and name == _FAIL_AT and _light_fuse():
        raise error(f"injected failure at {name} (REFGEN_FAIL_AT)")


def _hold(path: str) -> None:
    try:
        os.close(os.open(f"{path}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # another process holds, or held, here
    with open(path, "w"):
        pass
    until = time.monotonic() + _HOLD_AT_MOST_S
    while os.path.exists(path) and time.monotonic() < until:
        time.sleep(0.01)


def _light_fuse() -> bool:
    if _FUSE is None:
        return True
    try:
        os.close(os.open(_FUSE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
