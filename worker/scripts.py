"""Every Lua script the worker runs, from ``worker/lua/``.

Each file starts with a header naming its KEYS and ARGV. ``prelude.lua`` (the ``announce`` and
``server_now`` functions) is put in front of each, and ``@NAME@`` placeholders are filled from
``worker.constants``, so limits are written once.

The scripts are package data: a worker whose installation lacks one could take jobs and fail
every one of them, so ``load_all`` reads them all when a worker starts (``tasks/app.py``), and
a missing one stops it there.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

import redis
from redis.commands.core import Script

from worker import constants as c
from worker.errors import InstallationError

_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")

# Every script a worker runs; ``register`` takes no other name.
NAMES = (
    "backlog_first_seen",
    "begin_job",
    "cancel_job",
    "checkpoint_intent",
    "commit_result",
    "deadline_claim",
    "lease_claim",
    "lease_extend",
    "lease_hold",
    "lease_release",
    "lease_renew",
    "ledger_charge",
    "ledger_release",
    "ledger_reserve",
    "note_job",
    "publish",
    "queue_age",
    "ratelimit_admit",
    "ratelimit_back_off",
    "record_outcome",
    "worker_beat",
)


@cache
def source(name: str) -> str:
    """The full text Redis runs for ``name`` (e.g. ``"lease_claim"``): prelude included."""
    if name not in NAMES:
        raise ValueError(f"unknown Lua script {name!r}: add it to worker.scripts.NAMES")
    return _PLACEHOLDER.sub(lambda m: str(getattr(c, m[1])), _read("prelude") + _read(name))


def load_all() -> None:
    """Read every script now. Raises ``InstallationError`` naming the first one missing."""
    for name in NAMES:
        source(name)


def register(client: redis.Redis, name: str) -> Script:
    return client.register_script(source(name))


def _read(name: str) -> str:
    path = f"worker/lua/{name}.lua"
    try:
        return resources.files("worker.lua").joinpath(f"{name}.lua").read_text("utf-8")
    except OSError as exc:  # missing, or unreadable
        raise InstallationError(path, exc) from None
