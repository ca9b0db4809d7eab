"""Where refgen's Redis is, and how every process reaches it: one URL, or Sentinel.

With ``REDIS_SENTINELS`` and ``REDIS_SENTINEL_MASTER`` set, every client asks the Sentinels
which server is the primary, and asks again when a connection to it breaks: Celery's broker
and result backend (its ``sentinel://`` transport and backend, with ``master_name``) and our
own clients (redis-py's ``Sentinel.master_for``). ``REDIS_URL`` then gives only the database
number and, if it has them, the user and password of the Redis servers.

A ``rediss://`` URL (managed Redis) verifies the server's certificate by default; its query
may name a CA bundle (``?ssl_ca_certs=/path/ca.pem``) or relax the check
(``ssl_cert_reqs=none``), as redis-py reads it. The same options reach Celery.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelManagedConnection
from redis.sentinel import Sentinel, SentinelManagedConnection

_CERT_REQS = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
_TLS_QUERY = (
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_cert_reqs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)


class FollowingConnection(SentinelManagedConnection):
    """A connection that asks the Sentinels where the primary is whenever it reconnects.

    redis-py 8.1 asks only when a connection is first taken from the pool: a command retried
    after its connection broke (a failover) reconnects to the old primary's address, again
    and again until its retries run out (redis/redis-py#3874). Our clients retry every
    command, so without this each command in flight at a failover failed ~30 s later."""

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        if self._sock is None and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(*args, **kwargs)


class AsyncFollowingConnection(AsyncSentinelManagedConnection):
    """``FollowingConnection`` for asyncio (the gateway)."""

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(*args, **kwargs)


@dataclass(frozen=True)
class RedisEndpoint:
    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    sentinel_password: str | None = None
    password: str | None = None  # REDIS_PASSWORD: for a URL that carries none

    @property
    def uses_sentinel(self) -> bool:
        return bool(self.sentinels)

    def describe(self) -> str:
        """Where Redis is, without credentials: for messages and logs."""
        if self.uses_sentinel:
            hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"Sentinel master {self.master!r} via {hosts}"
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            return f"unix://{parts.path}"
        return f"{parts.scheme}://{parts.hostname or '?'}:{parts.port or 6379}{parts.path}"

    # Our own clients -------------------------------------------------------------------------

    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client; ``options`` are its connection options (timeouts, retry)."""
        if not self.uses_sentinel:
            return redis.Redis.from_url(self.url, **self._password(), **options)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels),
            sentinel_kwargs=self._sentinel_options(options),
            **self._node_options(),
            **options,
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            self._master(), redis_class=redis.Redis, connection_class=FollowingConnection
        )
        return client

    def async_client(self, **options: Any) -> aioredis.Redis:
        """The same, for asyncio (the gateway)."""
        if not self.uses_sentinel:
            return aioredis.Redis.from_url(self.url, **self._password(), **options)
        sentinel = AsyncSentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels),
            sentinel_kwargs=self._sentinel_options(options),
            **self._node_options(),
            **options,
        )
        client: aioredis.Redis = sentinel.master_for(
            self._master(), redis_class=aioredis.Redis, connection_class=AsyncFollowingConnection
        )
        return client

    # Celery ----------------------------------------------------------------------------------

    def celery_config(self) -> dict[str, Any]:
        """The broker and result-backend settings that point Celery at this Redis. The
        transport and backend classes are refgen's (``tasks/transport.py``,
        ``tasks/backend.py``)."""
        if self.uses_sentinel:
            hosts = ";".join(
                f"sentinel://{self._userinfo()}{host}:{port}/{self.db}"
                for host, port in self.sentinels
            )
            sentinel_options: dict[str, Any] = {"master_name": self._master()}
            if self.sentinel_password:
                sentinel_options["sentinel_kwargs"] = {"password": self.sentinel_password}
            return {
                "broker_url": hosts,
                "broker_transport": "tasks.transport:SentinelTransport",
                "broker_transport_options": sentinel_options,
                "result_backend": f"tasks.backend:PollingSentinelBackend+{hosts}",
                "result_backend_transport_options": sentinel_options,
            }
        parts = urlsplit(self.url)
        plain = urlunsplit(parts._replace(query="", fragment=""))
        if self.password and parts.scheme != "unix":
            plain = urlunsplit(parts._replace(netloc=self._userinfo() + _hostport(parts), query=""))
        config: dict[str, Any] = {
            "broker_url": plain,
            "broker_transport": "tasks.transport:Transport",
            "broker_transport_options": {},
            "result_backend": f"tasks.backend:PollingRedisBackend+{plain}",
            "result_backend_transport_options": {},
        }
        if parts.scheme == "rediss":
            config["broker_use_ssl"] = self.tls_options()
            config["redis_backend_use_ssl"] = self.tls_options()
        return config

    def tls_options(self) -> dict[str, Any]:
        """The TLS options of a ``rediss://`` URL, as Celery and kombu take them."""
        query = parse_qs(urlsplit(self.url).query)
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        for name in _TLS_QUERY:
            if name in query:
                options[name] = query[name][-1]
        reqs = options["ssl_cert_reqs"]
        if isinstance(reqs, str):
            options["ssl_cert_reqs"] = _CERT_REQS.get(reqs.lower(), ssl.CERT_REQUIRED)
        if "ssl_check_hostname" in options:
            options["ssl_check_hostname"] = options["ssl_check_hostname"].lower() in (
                "1",
                "true",
                "yes",
            )
        return options

    # -----------------------------------------------------------------------------------------

    @property
    def db(self) -> int:
        path = urlsplit(self.url).path.strip("/")
        return int(path) if path.isdigit() else 0

    def _master(self) -> str:
        if not self.master:
            raise ValueError("REDIS_SENTINEL_MASTER is required with REDIS_SENTINELS")
        return self.master

    def _password(self) -> dict[str, Any]:
        return {"password": self.password} if self.password else {}

    def _node_options(self) -> dict[str, Any]:
        """Database, user and password of the Redis servers Sentinel points at."""
        parts = urlsplit(self.url)
        options: dict[str, Any] = {"db": self.db}
        if parts.username:
            options["username"] = unquote(parts.username)
        password = _url_password(self.url) or self.password
        if password:
            options["password"] = password
        return options

    def _sentinel_options(self, options: dict[str, Any]) -> dict[str, Any]:
        # The Sentinels get the same timeouts as the servers, and their own password.
        kept = {k: v for k, v in options.items() if k.startswith("socket_")}
        if self.sentinel_password:
            kept["password"] = self.sentinel_password
        return kept

    def _userinfo(self) -> str:
        parts = urlsplit(self.url)
        password = _url_password(self.url) or self.password
        if not password and not parts.username:
            return ""
        user = quote(unquote(parts.username or ""), safe="")
        return f"{user}:{quote(password or '', safe='')}@"


def _hostport(parts: Any) -> str:
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"{host}:{parts.port}" if parts.port else host


def _url_password(url: str) -> str | None:
    """The password in a URL, decoded (``p%40ss`` is ``p@ss``)."""
    password = urlsplit(url).password
    return unquote(password) if password else None
