"""``refgen flower``: Flower, started only with credentials that really close it.

Flower 2.2 takes ``FLOWER_BASIC_AUTH`` as it is: an empty value becomes one empty credential,
and a header whose base64 decodes to nothing (``Basic !``, ``Basic ====``) matches it, so a
Flower started with ``FLOWER_BASIC_AUTH=`` served everyone, including the API that starts
tasks (paid work). A ``user:`` credential is matched by ``Basic dXNlcjo=`` the same way. So
every credential must be ASCII with a non-empty user and a non-empty password, or Flower does not
start (exit 5, one line); credentials on the command line are refused (they would bypass the
check and show in ``ps``), however spelt (Tornado strips any dashes and reads ``_`` as ``-``),
and so is a config file (Flower reads ``flowerconfig.py`` from the working directory by
default, and it could set ``basic_auth`` too): Flower is given an empty one. Flower serves its
own ``/metrics`` to anyone; here it asks for the same credentials as every other page.

Two doors Flower leaves open are closed here too (both found by knocking on the compose stack):
it counts no wrong passwords, so anyone who reaches it may guess at the speed of the network
(here a client gets ``FLOWER_FAILED_LOGINS_PER_MINUTE`` wrong ones in any 60 s, then 429
with ``Retry-After`` on every page that asks for credentials); and any
site may frame its pages (here ``X-Frame-Options: DENY`` and ``frame-ancestors 'none'`` on
every page). A client is the address its connection comes from, never one a header names
(Tornado's ``--xheaders`` would believe ``X-Real-Ip`` from anyone), an IPv6 one by its /64.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import structlog

from tasks import exit_codes
from worker.errors import ConfigurationError
from worker.logging import configure_logging
from worker.settings import Settings

log = structlog.get_logger(__name__)

# Tornado's names for them once dashes are stripped and ``_`` read as ``-``.
_REFUSED_OPTIONS = ("basic-auth", "auth", "unauthenticated-api", "conf")


def _option_name(arg: str) -> str | None:
    if not arg.startswith("-"):
        return None
    return arg.lstrip("-").split("=", 1)[0].replace("_", "-").lower()


def check_credentials(settings: Settings, flower_args: list[str]) -> None:
    """Raise ``ConfigurationError`` unless ``FLOWER_BASIC_AUTH`` holds only ``user:password``
    pairs with both parts non-empty. The message never holds a password."""
    for arg in flower_args:
        if _option_name(arg) in _REFUSED_OPTIONS:
            option = arg.split("=", 1)[0]
            raise ConfigurationError(
                f"refgen flower takes its credentials from FLOWER_BASIC_AUTH, not {option}"
            )
    for name in ("FLOWER_CONF", "FLOWER_AUTH"):
        if os.environ.get(name):
            raise ConfigurationError(
                f"refgen flower takes its credentials from FLOWER_BASIC_AUTH, not {name}"
            )
    if settings.flower_unauthenticated_api:
        raise ConfigurationError("FLOWER_UNAUTHENTICATED_API=true opens Flower's API to anyone")
    if settings.flower_basic_auth is None:
        raise ConfigurationError(
            "FLOWER_BASIC_AUTH is required: user:password (several: comma-separated), "
            "both non-empty"
        )
    for position, credential in enumerate(
        settings.flower_basic_auth.get_secret_value().split(","), start=1
    ):
        user, colon, password = credential.partition(":")
        if not credential.isascii():
            raise ConfigurationError(
                f"FLOWER_BASIC_AUTH credential #{position} must be ASCII (Flower compares "
                "credentials as ASCII: one that is not would let nobody in)"
            )
        if not colon or not user.strip() or not password.strip():
            raise ConfigurationError(
                f"FLOWER_BASIC_AUTH credential #{position} must be user:password with both "
                "non-empty (an empty one lets any request in)"
            )


def run_flower(settings: Settings, flower_args: list[str]) -> int:
    check_credentials(settings, flower_args)
    from tasks.app import app

    _metrics_behind_credentials()
    _guard_the_door(FailedLogins(settings.flower_failed_logins_per_minute))
    # Flower reads FLOWER_BASIC_AUTH from the environment itself: the value just checked. No
    # config file may replace it.
    app.start(["flower", *flower_args, *_json_logging(settings), f"--conf={os.devnull}"])
    return exit_codes.RESULT


def _json_logging(settings: Settings) -> list[str]:
    """With ``LOG_FORMAT=json``, Flower's lines are JSON like every other process's: tornado
    is told to leave logging alone (its own format is not JSON), and ours is set up."""
    if settings.log_format != "json":
        return []
    root = logging.getLogger()
    root.addHandler(logging.StreamHandler(sys.stderr))
    root.setLevel(settings.log_level.upper())
    configure_logging(settings)
    return ["--logging=none"]


def _metrics_behind_credentials() -> None:
    """Flower's ``/metrics`` (worker names, task names, failure counts) asks for credentials
    like every other page: its handler is swapped, in Flower's own list, before Flower builds
    its application from it."""
    from flower import urls
    from flower.views.monitor import Metrics
    from tornado import web

    class AuthenticatedMetrics(Metrics):  # type: ignore[misc]
        @web.authenticated
        async def get(self) -> None:
            await super().get()

    urls.handlers[:] = [
        (entry[0], AuthenticatedMetrics, *entry[2:])
        if isinstance(entry, tuple) and entry[1] is Metrics
        else entry
        for entry in urls.handlers
    ]


class FailedLogins:
    """Wrong passwords per client over the last ``window_s`` (a sliding window: never more
    than ``per_window`` in any such stretch); at most ``max_clients`` remembered, those with
    no wrong password left in their window forgotten first, then the longest quiet, so that
    a crowd of addresses cannot grow it without bound."""

    def __init__(self, per_window: int, window_s: float = 60.0, max_clients: int = 10_000) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self._max_clients = max_clients
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after_s(self, client: str, now: float | None = None) -> float | None:
        """Seconds until ``client`` may try again; None while it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._recent(client, now)
            if times is None or len(times) < self.per_window:
                return None
            return times[0] + self.window_s - now

    def failed(self, client: str, now: float | None = None) -> bool:
        """Count a wrong password; True when it is the one that stops ``client``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._recent(client, now) or deque(maxlen=self.per_window)
            stopped = len(times) == self.per_window - 1
            times.append(now)
            self._failures[client] = times
            self._failures.move_to_end(client)
            if len(self._failures) > self._max_clients:
                for quiet in [c for c, t in self._failures.items() if t[-1] <= now - self.window_s]:
                    del self._failures[quiet]
            while len(self._failures) > self._max_clients:
                self._failures.popitem(last=False)
            return stopped

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._failures.get(client)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if times is not None and not times:
            del self._failures[client]
            return None
        return times


def client_of(peer: object, fallback: str) -> str:
    """Whom a connection's wrong passwords count against: its peer address (``fallback``
    when there is none), an IPv4-mapped one as IPv4, an IPv6 one by its /64 (what one
    subscriber is given)."""
    host = peer[0] if isinstance(peer, tuple) and peer else fallback
    try:
        address = ipaddress.ip_address(str(host))
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _guard_the_door(failures: FailedLogins) -> None:
    """Every page and API call of Flower that asks for credentials goes through its handlers'
    ``get_current_user``: a client past its wrong passwords is answered 429 there, before any
    credential is looked at, and each wrong one it sends is counted. Every page says it may
    not be framed."""
    from flower.views import BaseHandler
    from tornado import web

    check = BaseHandler.get_current_user
    default_headers = BaseHandler.set_default_headers

    def get_current_user(self: Any) -> Any:
        context = getattr(self.request.connection, "context", None)
        client = client_of(getattr(context, "address", None), self.request.remote_ip or "")
        wait_s = failures.retry_after_s(client)
        if wait_s is not None:
            # Answered here: an HTTPError's answer is written after the headers are reset.
            self.set_status(429)
            self.set_header("Retry-After", str(math.ceil(wait_s)))
            self.set_header("Content-Type", "text/plain")
            raise web.Finish("Too many wrong passwords: try again later\n")
        try:
            return check(self)
        except web.HTTPError as exc:
            # A request without credentials (a browser's first) is not a guess.
            if exc.status_code == 401 and self.request.headers.get("Authorization"):
                wrong_password(client)
            raise
        except TypeError:
            # Flower's compare_digest raises on a password that is not ASCII: a wrong one,
            # counted, not a 500 (with a traceback logged) that anyone could ask for.
            wrong_password(client)
            raise web.HTTPError(401) from None

    def wrong_password(client: str) -> None:
        if failures.failed(client):
            # Once a stop, never a password: whom operators locked out can ask about.
            log.warning(
                "flower_client_stopped",
                client=client,
                wrong_passwords=failures.per_window,
                retry_after_s=round(failures.retry_after_s(client) or 0),
            )

    def set_default_headers(self: Any) -> None:
        default_headers(self)
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", "frame-ancestors 'none'")

    BaseHandler.get_current_user = get_current_user
    BaseHandler.set_default_headers = set_default_headers
