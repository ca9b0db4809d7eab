"""Where Redis is: one URL, or Sentinel; and what each kind of client is given."""

from __future__ import annotations

import ssl

import pytest
from pydantic import ValidationError

from worker.redis_endpoint import FollowingConnection
from worker.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "REDIS_URL",
        "REDIS_SENTINELS",
        "REDIS_SENTINEL_MASTER",
        "REDIS_SENTINEL_PASSWORD",
        "REDIS_PASSWORD",
        "REDIS_WAIT_REPLICAS",
    ):
        monkeypatch.delenv(name, raising=False)


def sentinel_settings(monkeypatch: pytest.MonkeyPatch, **extra: str) -> Settings:
    monkeypatch.setenv("REDIS_SENTINELS", "10.0.0.1:26379, 10.0.0.2:26380,10.0.0.3:26381")
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "refgen")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_sentinels_take_precedence_over_the_urls_host(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = sentinel_settings(
        monkeypatch, REDIS_URL="redis://ignored-host:6379/3", REDIS_PASSWORD="node-secret"
    )
    endpoint = settings.redis_endpoint()
    assert endpoint.sentinels == (
        ("10.0.0.1", 26379),
        ("10.0.0.2", 26380),
        ("10.0.0.3", 26381),
    )
    assert endpoint.db == 3
    config = endpoint.celery_config()
    assert config["broker_url"] == (
        "sentinel://:node-secret@10.0.0.1:26379/3;sentinel://:node-secret@10.0.0.2:26380/3;"
        "sentinel://:node-secret@10.0.0.3:26381/3"
    )
    assert config["broker_transport"] == "tasks.transport:SentinelTransport"
    assert (
        config["result_backend"] == f"tasks.backend:PollingSentinelBackend+{config['broker_url']}"
    )
    assert config["broker_transport_options"] == {"master_name": "refgen"}
    assert config["result_backend_transport_options"] == {"master_name": "refgen"}
    assert "ignored-host" not in str(config)


def test_a_sentinel_password_reaches_the_sentinels_only(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = sentinel_settings(monkeypatch, REDIS_SENTINEL_PASSWORD="sentinel-secret")
    config = settings.redis_endpoint().celery_config()
    assert config["broker_transport_options"]["sentinel_kwargs"] == {"password": "sentinel-secret"}
    assert "sentinel-secret" not in config["broker_url"]
    assert settings.wait_replicas == 1  # Sentinel means replicas: money and results wait


def test_our_clients_ask_the_sentinels(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = sentinel_settings(monkeypatch, REDIS_PASSWORD="node-secret")
    client = settings.redis_endpoint().client(socket_timeout=7)
    pool = client.connection_pool
    assert pool.service_name == "refgen"  # type: ignore[attr-defined]
    assert pool.connection_kwargs["password"] == "node-secret"
    assert pool.connection_class is FollowingConnection  # follows a failover mid-command
    sentinel = pool.sentinel_manager.sentinels[0]  # type: ignore[attr-defined]
    # The Sentinels get the timeouts, not the servers' password.
    assert sentinel.connection_pool.connection_kwargs["socket_timeout"] == 7
    assert sentinel.connection_pool.connection_kwargs.get("password") is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_SENTINELS": "10.0.0.1:26379"}, "REDIS_SENTINEL_MASTER is required"),
        ({"REDIS_SENTINEL_MASTER": "refgen"}, "REDIS_SENTINELS is required"),
        (
            {"REDIS_SENTINELS": "10.0.0.1", "REDIS_SENTINEL_MASTER": "refgen"},
            "host:port pairs",
        ),
        (
            {"REDIS_SENTINELS": "10.0.0.1:99999", "REDIS_SENTINEL_MASTER": "refgen"},
            "host:port pairs",
        ),
        (
            {
                "REDIS_SENTINELS": "10.0.0.1:26379",
                "REDIS_SENTINEL_MASTER": "refgen",
                "REDIS_URL": "rediss://cache:6380/0",
            },
            "TLS through Sentinel is not supported",
        ),
        ({"REDIS_PASSWORD": "changeme"}, "placeholder"),
    ],
)
def test_half_configured_redis_is_refused_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_a_managed_redis_url_gives_celery_its_tls_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "REDIS_URL", "rediss://app:url-secret@cache.example:6380/1?ssl_ca_certs=/etc/ca.pem"
    )
    settings = Settings()
    config = settings.redis_endpoint().celery_config()
    assert config["broker_url"] == "rediss://app:url-secret@cache.example:6380/1"
    tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"}
    assert config["broker_use_ssl"] == tls and config["redis_backend_use_ssl"] == tls
    assert settings.wait_replicas == 0  # one endpoint: nothing to wait for unless asked
    assert "url-secret" in settings.secret_values()  # redacted from logs like any secret


def test_a_password_given_apart_from_the_url_reaches_celery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("REDIS_PASSWORD", "p@ss/word")
    settings = Settings()
    assert settings.redis_endpoint().celery_config()["broker_url"] == (
        "redis://:p%40ss%2Fword@cache:6379/0"
    )
    assert "p@ss/word" in settings.secret_values()


def test_descriptions_for_logs_carry_no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "rediss://app:url-secret@cache.example:6380/1")
    assert Settings().redis_endpoint().describe() == "rediss://cache.example:6380/1"
    monkeypatch.delenv("REDIS_URL")
    described = sentinel_settings(monkeypatch, REDIS_PASSWORD="x-secret").redis_endpoint()
    assert "secret" not in described.describe()
    assert "refgen" in described.describe() and "10.0.0.2:26380" in described.describe()


def test_percent_encoded_credentials_are_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = sentinel_settings(monkeypatch, REDIS_URL="redis://app%40ops:p%40ss%2Fw@x:6379/0")
    endpoint = settings.redis_endpoint()
    pool = endpoint.client().connection_pool
    assert pool.connection_kwargs["username"] == "app@ops"
    assert pool.connection_kwargs["password"] == "p@ss/w"
    assert endpoint.celery_config()["broker_url"].startswith("sentinel://app%40ops:p%40ss%2Fw@")
    assert {"p%40ss%2Fw", "p@ss/w"} <= set(settings.secret_values())


def test_ipv6_hosts_keep_their_brackets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://[::1]:6379/0")
    monkeypatch.setenv("REDIS_PASSWORD", "node-secret")
    assert Settings().redis_endpoint().celery_config()["broker_url"] == (
        "redis://:node-secret@[::1]:6379/0"
    )
    monkeypatch.delenv("REDIS_URL")
    settings = sentinel_settings(monkeypatch, REDIS_SENTINELS="[::1]:26379,10.0.0.2:26379")
    assert settings.redis_endpoint().sentinels[0] == ("::1", 26379)


def test_a_settings_error_does_not_print_the_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", "node-secret-value")
    monkeypatch.setenv("REDIS_SENTINELS", "10.0.0.1:26379")
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert "node-secret-value" not in str(raised.value)
