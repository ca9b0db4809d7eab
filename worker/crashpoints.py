"""A test-only switch that makes a worker die, or fail, at one named point of its work.

For tests only. ``REFGEN_CRASH_AT=<point>`` makes the process SIGKILL its whole process group
when it reaches that point: the way a worker dies at an arbitrary instruction, landed exactly
where state is half-written. ``REFGEN_FAIL_AT=<point>`` raises a broker ``ConnectionError``
there instead. With ``REFGEN_CRASH_FUSE=<file>`` the switch fires once across every process that
shares the file (the first to create it), so a standby worker with the same environment carries
on. The variables are read once, at import; unset, every call is one comparison with ``None``.

The points, in the order a job meets them, are listed in ``POINTS`` (README: Reliability).
"""

from __future__ import annotations

import os
import signal

from redis.exceptions import ConnectionError as RedisConnectionError

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

_CRASH_AT = os.environ.get("REFGEN_CRASH_AT") or None
_FAIL_AT = os.environ.get("REFGEN_FAIL_AT") or None
_FUSE = os.environ.get("REFGEN_CRASH_FUSE") or None


def crash_point(name: str) -> None:
    if _CRASH_AT is not None and name == _CRASH_AT and _light_fuse():
        os.killpg(os.getpgrp(), signal.SIGKILL)


def fail_point(name: str) -> None:
    if _FAIL_AT is not None and name == _FAIL_AT and _light_fuse():
        raise RedisConnectionError(f"injected failure at {name} (REFGEN_FAIL_AT)")


def _light_fuse() -> bool:
    if _FUSE is None:
        return True
    try:
        os.close(os.open(_FUSE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
