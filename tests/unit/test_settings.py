from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.errors import ConfigurationError
from worker.settings import Settings

BACKEND_VARS = (
    "REDIS_URL",
    "REPLICATE_API_TOKEN",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_KEY",
    "ENVIRONMENT",
    "GENERATOR_BACKEND",
    "STORAGE_BACKEND",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in BACKEND_VARS:
        monkeypatch.delenv(name, raising=False)


def test_auto_picks_local_without_credentials() -> None:
    settings = Settings()
    assert settings.resolved_generator_backend() == "local"
    assert settings.resolved_storage_backend() == "local"


def test_auto_picks_real_services_with_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_test_token_made_at_runtime")
    monkeypatch.setenv("SUPABASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", "service-key-made-at-runtime")
    settings = Settings()
    assert settings.resolved_generator_backend() == "replicate"
    assert settings.resolved_storage_backend() == "supabase"


def test_production_needs_only_redis_until_the_backends_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beat, Flower, the gateway and `refgen run` hold no credentials; the worker checks."""
    monkeypatch.setenv("ENVIRONMENT", "production")
    settings = Settings()
    assert settings.secret_values() == []
    with pytest.raises(ConfigurationError, match="REPLICATE_API_TOKEN"):
        settings.check_backends()


def test_production_without_the_store_credentials_fails_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_test_token_made_at_runtime")
    with pytest.raises(ConfigurationError, match="SUPABASE_SERVICE_KEY"):
        Settings().check_backends()


def test_explicit_local_is_honoured_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("GENERATOR_BACKEND", "local")
    monkeypatch.setenv("STORAGE_BACKEND", "local")
    settings = Settings()
    settings.check_backends()
    assert settings.resolved_generator_backend() == "local"


def test_explicit_replicate_without_token_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENERATOR_BACKEND", "replicate")
    with pytest.raises(ConfigurationError):
        Settings().check_backends()


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://user:pw@cache:6380/2", "unix:///run/redis.sock"]
)
def test_redis_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    assert Settings().redis_url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("localhost:6379", "must be a URL such as redis://localhost:6379/0"),
        ("127.0.0.1", "must be a URL"),
        ("http://localhost:6379/0", "must be a URL"),
        ("redis://", "must be a URL"),
        ("redis://localhost:port/0", "port that is not a number"),
    ],
)
def test_a_malformed_redis_url_is_refused_with_what_to_write(
    monkeypatch: pytest.MonkeyPatch, url: str, says: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ValidationError, match=says):
        Settings()


@pytest.mark.parametrize("placeholder", ["changeme", "your-token-here", "<token>", "xxx", "  "])
def test_placeholder_secrets_are_refused(monkeypatch: pytest.MonkeyPatch, placeholder: str) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", placeholder)
    with pytest.raises(ValidationError, match="placeholder"):
        Settings()


def test_secrets_do_not_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_visible_if_leaked_123456")
    settings = Settings()
    assert "r8_visible_if_leaked_123456" not in repr(settings)
    assert settings.secret_values() == ["r8_visible_if_leaked_123456"]


def test_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_GENERATOR_FAIL_IDS", "a, b,,c")
    assert Settings().local_generator_fail_ids == ["a", "b", "c"]


def test_environment_selects_model_and_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFERENCE_MODEL_DEV", "owner/dev:abc")
    assert Settings().model_version == "owner/dev:abc"
    assert Settings().inference_steps == 25


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose passes ``REPLICATE_API_TOKEN=`` through when the host has none."""
    monkeypatch.setenv("REPLICATE_API_TOKEN", "")
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", "")
    settings = Settings()
    assert settings.replicate_api_token is None
    assert settings.resolved_generator_backend() == "local"


RATE_VARS = (
    "REPLICATE_CREATES_PER_MINUTE",
    "REPLICATE_REQUESTS_PER_MINUTE",
    "REPLICATE_CREATES_PER_SECOND",
)


def test_replicate_limits_default_to_the_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RATE_VARS:
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.replicate_creates_per_minute, settings.replicate_requests_per_minute) == (
        600,
        3000,
    )


def test_the_old_per_second_limit_still_works_unless_per_minute_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in RATE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REPLICATE_CREATES_PER_SECOND", "5")
    assert Settings().replicate_creates_per_minute == 300
    monkeypatch.setenv("REPLICATE_CREATES_PER_MINUTE", "120")
    assert Settings().replicate_creates_per_minute == 120
    monkeypatch.setenv("REPLICATE_CREATES_PER_SECOND", "many")
    with pytest.raises(ValidationError, match="replicate_creates_per_second"):
        Settings()


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret-pw@127.0.0.1:63O79/0",  # a letter O in the port
        "rediss://ops:s3cret-pw@redis.example:6380x/0",
        "http://:s3cret-pw@127.0.0.1:6379/0",  # wrong scheme
        "redis://:s3cret-pw/with@slash@127.0.0.1:bad/0",  # an unencoded password
    ],
)
def test_a_malformed_redis_url_error_masks_its_password(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "s3cret-pw" not in str(caught.value)
    assert ":****@" in str(caught.value)
