"""The gateway's doors in-process (Starlette's TestClient, fakeredis): CORS only from the
allow-list, and which settings ask for tokens."""

from __future__ import annotations

import warnings

import fakeredis
import pytest

from gateway.app import create_app, metrics_client, request_client
from gateway.auth import mint
from gateway.stream import stream_client
from worker.errors import ConfigurationError
from worker.settings import Settings

with warnings.catch_warnings():
    # Starlette asks for httpx2 here; the project pins httpx (its clients use it).
    warnings.simplefilter("ignore", UserWarning)  # StarletteDeprecationWarning
    from starlette.testclient import TestClient

SECRET = "unit-test-gateway-secret-0123456789"


def client(**settings: object) -> TestClient:
    server = fakeredis.FakeServer()
    app = create_app(
        Settings(**settings),  # type: ignore[arg-type]
        client=fakeredis.aioredis.FakeRedis(server=server, decode_responses=True),
        streams=fakeredis.aioredis.FakeRedis(server=server, decode_responses=True),
        sync_client=fakeredis.FakeRedis(server=server, decode_responses=True),
    )
    return TestClient(app)


def test_cors_only_from_the_allowed_origins() -> None:
    gateway = client(gateway_jwt_secret=SECRET, gateway_allowed_origins="https://app.example")
    token = mint(SECRET, operator=True, ttl_s=60)
    allowed = gateway.get(
        "/",
        headers={"Origin": "https://app.example", "Authorization": f"Bearer {token}"},
    )
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = gateway.get(
        "/",
        headers={"Origin": "https://evil.example", "Authorization": f"Bearer {token}"},
    )
    assert "access-control-allow-origin" not in other.headers
    # A preflight carries no token: answered by CORS, allowing the Authorization header.
    preflight = gateway.options(
        "/jobs/abc/events",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = gateway.options(
        "/jobs/abc/events",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert refused.status_code == 400


def test_which_settings_ask_for_tokens() -> None:
    assert client().get("/").status_code == 200  # development, no secret: open
    assert client(gateway_jwt_secret=SECRET).get("/").status_code == 401
    open_production = client(environment="production", gateway_auth="off")
    assert open_production.get("/").status_code == 200
    with pytest.raises(ConfigurationError):
        client(environment="production")
    with pytest.raises(ConfigurationError):
        client(gateway_auth="on")


def test_the_gateways_redis_clients_do_not_send_client_setinfo() -> None:
    """Compose's Redis user for the gateway may not run it (docker-compose.yml); Redis 7.2+
    would log every connection's refusal in the ACL log."""
    endpoint = Settings(redis_url="redis://gateway@127.0.0.1:1/0").redis_endpoint()
    for client in (request_client(endpoint), stream_client(endpoint), metrics_client(endpoint)):
        connection = client.connection_pool.make_connection()
        assert connection.driver_info is None
        assert client.connection_pool.connection_kwargs["username"] == "gateway"
