"""Every Lua script the worker runs, from ``worker/lua/``.

Each file starts with a header naming its KEYS and ARGV. ``prelude.lua`` (the ``announce`` and
``server_now`` functions) is put in front of each, and ``@NAME@`` placeholders are filled from
``worker.constants``, so limits are written once.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

import redis
from redis.commands.core import Script

from worker import constants as c

_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


@cache
def source(name: str) -> str:
    """The full text Redis runs for ``name`` (e.g. ``"lease_claim"``): prelude included."""
    folder = resources.files("worker.lua")
    text = folder.joinpath("prelude.lua").read_text("utf-8") + folder.joinpath(
        f"{name}.lua"
    ).read_text("utf-8")
    return _PLACEHOLDER.sub(lambda m: str(getattr(c, m[1])), text)


def register(client: redis.Redis, name: str) -> Script:
    return client.register_script(source(name))
