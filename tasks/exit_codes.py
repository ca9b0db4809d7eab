"""``refgen``'s exit codes, in one place: the commands return them and ``--help`` lists them."""

from __future__ import annotations

from typing import Final

RESULT: Final = 0
TEXT_ONLY: Final = 1
INVALID: Final = 2
BROKER: Final = 3
TIMEOUT: Final = 4
CONFIGURATION: Final = 5
WORKER_FAILED: Final = 6
CANCELLED: Final = 7
INTERRUPTED: Final = 130
# refgen cancel: the job had ended before the cancel, which changed nothing.
ALREADY_ENDED: Final = 1

MEANINGS: Final = (
    (RESULT, "the job made reference images: its ReferenceImages JSON is on stdout"),
    (TEXT_ONLY, "the result is null (text-only): too few images, or refused for budget"),
    (INVALID, "the plan file is not a valid plan, or the command line is wrong"),
    (BROKER, "Redis cannot be reached, or was lost for longer than BROKER_GRACE_S"),
    (TIMEOUT, "no result within --timeout (the job may still finish)"),
    (CONFIGURATION, "a setting in the environment is wrong (e.g. a malformed REDIS_URL)"),
    (WORKER_FAILED, "the worker failed the job's start (a fault, not a refusal): reason on stderr"),
    (CANCELLED, "the job was cancelled (refgen cancel): its result is null"),
    (INTERRUPTED, "interrupted (Ctrl-C); the job stays queued or running"),
)

CANCEL_MEANINGS: Final = (
    (RESULT, "the job is cancelled (now or before), or will not start"),
    (ALREADY_ENDED, "the job had already ended: nothing changed"),
    (INVALID, "not a job id, or the command line is wrong"),
    (BROKER, "Redis cannot be reached"),
    (TIMEOUT, "no worker answered within --timeout (the cancel stays queued and applies then)"),
    (CONFIGURATION, "a setting in the environment is wrong (e.g. a malformed REDIS_URL)"),
    (INTERRUPTED, "interrupted (Ctrl-C); a cancel already sent still applies"),
)


def describe(meanings: tuple[tuple[int, str], ...] = MEANINGS) -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in meanings)
