"""One ``Settings`` object, read from the environment once and passed in (SPEC §9)."""

from __future__ import annotations

import contextlib
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

import jwt
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker import constants as c
from worker.errors import ConfigurationError
from worker.redis_endpoint import RedisEndpoint

Environment = Literal["development", "production"]
GeneratorBackend = Literal["replicate", "local", "auto"]
StorageBackend = Literal["supabase", "local", "auto"]

# Values people paste from templates. A secret equal to one of these is refused at start-up,
# so a half-configured deployment fails loudly instead of sending "changeme" to Replicate.
_PLACEHOLDER_MARKERS = (
    "changeme",
    "change-me",
    "change_me",
    "placeholder",
    "your-",
    "your_",
    "xxx",
    "<",
    "todo",
    "replace",
)


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _is_placeholder(value: str) -> bool:
    lowered = value.strip().lower()
    return not lowered or any(marker in lowered for marker in _PLACEHOLDER_MARKERS)


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    # An empty variable counts as unset: Compose and CI templates often pass ``X=`` through.
    # hide_input_in_errors: a validation error would otherwise print every setting, secrets
    # included, wherever a process shows the exception (celery's own start-up, say).
    model_config = SettingsConfigDict(
        env_file=None,
        extra="ignore",
        frozen=True,
        env_ignore_empty=True,
        hide_input_in_errors=True,
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis through Sentinel (README: Redis failover): "host:port,host:port" and the master's
    # name. When set they take precedence over REDIS_URL's host, for every process.
    redis_sentinels: Annotated[list[str], NoDecode] = []
    redis_sentinel_master: str | None = None
    redis_sentinel_password: SecretStr | None = None
    # For a REDIS_URL that carries no password (a managed Redis's AUTH token, say).
    redis_password: SecretStr | None = None
    # Money, outcome and result writes wait for this many replicas to hold them (WAIT), at
    # most this long. Unset: 1 with Sentinel, 0 (no waiting) otherwise.
    redis_wait_replicas: int | None = Field(default=None, ge=0, le=10)
    # Under the clients' 30 s socket timeout, so a WAIT never outlasts its own read.
    redis_wait_timeout_ms: int = Field(default=1000, ge=10, le=20_000)
    environment: Environment = "development"

    replicate_api_token: SecretStr | None = None
    reference_model_prod: str = c.SDXL_VERSION
    reference_model_dev: str = c.SDXL_VERSION
    hardware_price_per_second: Decimal = c.DEFAULT_HARDWARE_PRICE_PER_S
    # Shared by all workers: Replicate allows 600 prediction creates a minute and 3,000 of
    # every other request (polls, cancels, lists).
    replicate_creates_per_minute: int = Field(default=c.REPLICATE_CREATES_PER_MINUTE, ge=1)
    replicate_requests_per_minute: int = Field(default=c.REPLICATE_REQUESTS_PER_MINUTE, ge=1)
    # Deprecated: the old name of the create limit, per second. Read only when
    # REPLICATE_CREATES_PER_MINUTE is not set.
    replicate_creates_per_second: int | None = Field(default=None, ge=1)
    image_timeout_s: float = Field(default=c.IMAGE_TIMEOUT_S, gt=0)
    # A job still unfinished this long after it started is finalized with what exists.
    job_deadline_s: float = Field(default=c.JOB_DEADLINE_S, gt=0)
    # A running task's lease; a worker silent this long is presumed dead and its tasks resent.
    lease_ttl_s: float = Field(default=c.LEASE_TTL_S, ge=2)

    supabase_url: str | None = None
    supabase_service_key: SecretStr | None = None
    storage_bucket: str = c.DEFAULT_BUCKET
    retention_success_days: int = Field(default=c.RETENTION_SUCCESS_DAYS, ge=1)
    retention_failure_days: int = Field(default=c.RETENTION_FAILURE_DAYS, ge=1)

    generator_backend: GeneratorBackend = "auto"
    storage_backend: StorageBackend = "auto"

    reference_gen_concurrency: int = Field(default=4, ge=1, le=64)
    reference_gen_pool: Literal["threads", "prefork", "solo"] = "threads"
    reference_gen_queues: Annotated[list[str], NoDecode] = [c.DEFAULT_QUEUE, "celery"]
    # Smaller jobs first, and start, finalize and retries before images (worker/fairness.py);
    # false: every message in one list per queue, first in first out.
    reference_gen_fairness: bool = True
    # With fairness: a priority level whose next image has waited this long rises a level, so
    # a large job under a stream of small ones is served within levels × this (README).
    reference_gen_aging_s: float = Field(default=c.QUEUE_AGING_S, gt=0)
    max_images_per_job: int = Field(default=c.MAX_IMAGES_PER_JOB, ge=1)
    # How long a job's result and bookkeeping stay readable in Redis (README: Scaling).
    job_state_ttl_s: int = Field(default=c.JOB_STATE_TTL_S, ge=3600)
    budget_per_video_minute: Decimal = c.BUDGET_PER_VIDEO_MINUTE

    local_generator_latency_s: float = Field(default=1.0, ge=0)
    local_generator_fail_ids: Annotated[list[str], NoDecode] = []
    local_generator_flaky_ids: Annotated[list[str], NoDecode] = []
    local_generator_reject_ids: Annotated[list[str], NoDecode] = []
    local_generator_cost: Decimal = c.FALLBACK_IMAGE_COST
    local_storage_dir: Path = Path(".refgen/storage")
    # Where the gateway serves the local store (e.g. http://127.0.0.1:8000): signed links then
    # point there instead of at file:// paths, so a browser can show them.
    local_storage_public_url: str | None = None
    # Appends one line per image the local generator makes: how tests count generations.
    local_generator_journal: Path | None = None

    # Retirement (README: Long-running workers): after this many jobs, or past this much memory
    # (PSS of the worker and its pool processes), a worker finishes what it holds and exits
    # cleanly for its supervisor to replace it. 0: off.
    worker_max_jobs: int = Field(default=0, ge=0)
    worker_max_memory_mb: int = Field(default=0, ge=0)

    # Comment lines an idle SSE stream sends to keep proxies from closing it.
    gateway_keepalive_s: float = Field(default=15.0, gt=0)
    # The gateway's tokens (gateway/auth.py): HS256 secrets, comma-separated. The first signs,
    # every one verifies, so a new secret goes first and the old one stays until its tokens
    # have expired (README: Security).
    gateway_jwt_secret: SecretStr | None = None
    # "off": no tokens asked, for a gateway on a private network only (production refuses to
    # start without a secret otherwise). "on": tokens even in development.
    gateway_auth: Literal["on", "off"] | None = None
    # Origins whose pages may read the gateway's answers (CORS); none by default.
    gateway_allowed_origins: Annotated[list[str], NoDecode] = []

    # Flower's own variables, read here so `refgen flower` can refuse to start without real
    # credentials (tasks/flower.py); Flower reads them from the environment itself.
    flower_basic_auth: SecretStr | None = None
    flower_unauthenticated_api: bool = False
    # Wrong passwords one client may send Flower in any 60 s; past them, 429 whatever it sends
    # (tasks/flower.py: Flower itself counts nothing).
    flower_failed_logins_per_minute: int = Field(default=10, ge=1)

    # The gateway's door (README: Scaling the gateway): at most this many event streams open on
    # one process, and per client address; past either, 503 with Retry-After. The process's
    # file-descriptor limit lowers the global cap when it is smaller.
    gateway_max_streams: int = Field(default=10_000, ge=1)
    gateway_max_streams_per_client: int = Field(default=50, ge=1)
    # A stream ends after this long (jittered by up to a tenth); the browser reconnects with
    # Last-Event-ID and resumes, so long-lived connections move between gateways.
    gateway_stream_lifetime_s: float = Field(default=1800.0, gt=0)
    # Against slowloris: a request's headers must arrive within this; a stream whose client
    # stops reading for this long is dropped (it resumes with Last-Event-ID).
    gateway_header_timeout_s: float = Field(default=10.0, gt=0)
    gateway_write_timeout_s: float = Field(default=30.0, gt=0)
    # Events one viewer may have waiting; a viewer that falls this far behind is dropped.
    gateway_viewer_queue: int = Field(default=256, ge=1)
    # Proxies whose X-Forwarded-For the gateway believes (uvicorn's own variable name), comma-
    # separated. None by default: uvicorn alone would trust 127.0.0.1, so anything relaying
    # from loopback (a tunnel, a proxy passing the header on) could pick its client address
    # and so step around the per-client cap.
    forwarded_allow_ips: str = ""

    # How long `refgen run` waits for a lost broker before it says so and exits.
    broker_grace_s: float = Field(default=30.0, ge=0)

    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "console"

    _csv = field_validator(
        "redis_sentinels",
        "reference_gen_queues",
        "gateway_allowed_origins",
        "local_generator_fail_ids",
        "local_generator_flaky_ids",
        "local_generator_reject_ids",
        mode="before",
    )(_split_csv)

    @field_validator(
        "replicate_api_token",
        "supabase_service_key",
        "redis_password",
        "redis_sentinel_password",
    )
    @classmethod
    def _refuse_placeholder_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and _is_placeholder(value.get_secret_value()):
            raise ValueError("looks like a placeholder; set the real secret or leave it unset")
        return value

    @field_validator("gateway_jwt_secret")
    @classmethod
    def _jwt_secrets_are_strong(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secrets = _split_secrets(value.get_secret_value())
        if not secrets or len(secrets) > 2:
            raise ValueError("must be one secret, or two separated by a comma (new,old)")
        for secret in secrets:
            if _is_placeholder(secret):
                raise ValueError("looks like a placeholder; set the real secret or leave it unset")
            # RFC 7518 §3.2: an HS256 key at least as long as the hash (32 bytes).
            if len(secret.encode()) < 32:
                raise ValueError(
                    "each secret must be at least 32 characters (e.g. `openssl rand -hex 32`)"
                )
        return value

    @field_validator("gateway_allowed_origins")
    @classmethod
    def _origins_are_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
                raise ValueError(f"must be origins such as https://app.example, not {origin!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _creates_per_second_is_per_minute(cls, data: object) -> object:
        if isinstance(data, dict):
            per_second = data.get("replicate_creates_per_second")
            if per_second not in (None, "") and data.get("replicate_creates_per_minute") is None:
                # A value that is no number is left to the field's own validation.
                with contextlib.suppress(TypeError, ValueError):
                    data = {**data, "replicate_creates_per_minute": int(per_second) * 60}
        return data

    @field_validator("redis_url")
    @classmethod
    def _redis_url_has_a_scheme(cls, value: str) -> str:
        # redis-py accepts only URLs; "localhost:6379" would otherwise fail deep inside a
        # client with a traceback, in whichever process first connects.
        parts = urlsplit(value.strip())
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            raise ValueError(f"has a port that is not a number: {masked_url(value)!r}") from None
        if parts.scheme not in _REDIS_SCHEMES or (parts.scheme != "unix" and not parts.hostname):
            raise ValueError(
                f"must be a URL such as redis://localhost:6379/0, not {masked_url(value)!r} "
                f"(schemes: {', '.join(_REDIS_SCHEMES)})"
            )
        return value.strip()

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_are_host_port(cls, value: list[str]) -> list[str]:
        for item in value:
            host, _, port = item.rpartition(":")
            if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"must be host:port pairs separated by commas, not {item!r}")
        return value

    @model_validator(mode="after")
    def _sentinel_settings_agree(self) -> Settings:
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ValueError("REDIS_SENTINEL_MASTER is required with REDIS_SENTINELS")
        if self.redis_sentinel_master and not self.redis_sentinels:
            raise ValueError("REDIS_SENTINELS is required with REDIS_SENTINEL_MASTER")
        if self.redis_sentinels and urlsplit(self.redis_url).scheme != "redis":
            # Untested against a TLS Sentinel deployment, so refused rather than half-working.
            raise ValueError(
                "REDIS_SENTINELS works with a redis:// REDIS_URL only (TLS through Sentinel is "
                "not supported); a managed Redis is reached by its rediss:// URL alone"
            )
        return self

    def redis_endpoint(self) -> RedisEndpoint:
        """Where this deployment's Redis is: the URL, or the Sentinels and the master's name."""
        return RedisEndpoint(
            url=self.redis_url,
            sentinels=tuple(
                (host.strip("[]"), int(port))  # [::1]:26379 is IPv6
                for host, _, port in (item.rpartition(":") for item in self.redis_sentinels)
            ),
            master=self.redis_sentinel_master,
            sentinel_password=_secret(self.redis_sentinel_password),
            password=_secret(self.redis_password),
        )

    @property
    def wait_replicas(self) -> int:
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_sentinels else 0

    @property
    def gateway_jwt_secrets(self) -> list[str]:
        """The gateway's secrets, the signing one first; empty when none is set."""
        if self.gateway_jwt_secret is None:
            return []
        return _split_secrets(self.gateway_jwt_secret.get_secret_value())

    def gateway_requires_tokens(self) -> bool:
        """Whether the gateway asks for tokens. Raises ``ConfigurationError`` for a production
        gateway left without a secret: it fails closed unless told the network is private."""
        if self.gateway_auth == "off":
            return False
        if self.gateway_jwt_secrets:
            return True
        if self.gateway_auth == "on" or self.environment == "production":
            raise ConfigurationError(
                "GATEWAY_JWT_SECRET is required"
                + (" in production" if self.environment == "production" else "")
                + " (at least 32 random characters, e.g. `openssl rand -hex 32`); "
                "GATEWAY_AUTH=off serves without tokens, on a private network only"
            )
        return False

    def check_backends(self) -> None:
        """Raise ``ConfigurationError`` unless the backends this process will use can work.

        Only the worker uses the generator and the store, so only the worker calls this (at
        start-up, before it takes a task): beat, Flower, the gateway and ``refgen run`` need
        Redis alone and never see the backends' credentials."""
        self.resolved_generator_backend()
        self.resolved_storage_backend()

    @property
    def model_version(self) -> str:
        if self.environment == "production":
            return self.reference_model_prod
        return self.reference_model_dev

    @property
    def inference_steps(self) -> int:
        return 40 if self.environment == "production" else 25

    def resolved_generator_backend(self) -> Literal["replicate", "local"]:
        has_token = self.replicate_api_token is not None
        if self.generator_backend == "local":
            return "local"
        if has_token:
            return "replicate"
        if self.generator_backend == "replicate" or self.environment == "production":
            raise ConfigurationError(
                "REPLICATE_API_TOKEN is required for the replicate generator"
                + (" in production" if self.environment == "production" else "")
            )
        return "local"

    def resolved_storage_backend(self) -> Literal["supabase", "local"]:
        has_creds = bool(self.supabase_url) and self.supabase_service_key is not None
        if self.storage_backend == "local":
            return "local"
        if has_creds:
            _check_service_role(self.supabase_service_key)
            return "supabase"
        if self.storage_backend == "supabase" or self.environment == "production":
            raise ConfigurationError(
                "SUPABASE_URL and SUPABASE_SERVICE_KEY are required for the supabase store"
                + (" in production" if self.environment == "production" else "")
            )
        return "local"

    def secret_values(self) -> list[str]:
        """Every secret in force, for log redaction."""
        secrets = [
            self.replicate_api_token,
            self.supabase_service_key,
            self.redis_password,
            self.redis_sentinel_password,
        ]
        values = [s.get_secret_value() for s in secrets if s is not None]
        values += self.gateway_jwt_secrets
        if self.flower_basic_auth is not None:
            credentials = self.flower_basic_auth.get_secret_value().split(",")
            values += [p for c in credentials if (p := c.partition(":")[2].strip())]
        url_password = urlsplit(self.redis_url).password
        if not url_password:
            return values
        return [*values, url_password, unquote(url_password)]


def _check_service_role(key: SecretStr | None) -> None:
    """Refuse a Supabase key whose ``role`` claim is not ``service_role``. With the anon key the
    storage server hides every bucket and refuses every write (row-level security), so every
    image would fail as a missing bucket and the retention purge would delete nothing. The
    claim is read, not verified: only the server knows its secret. A key that is no JWT (the
    newer ``sb_secret_...`` keys) names no role and is left to the server."""
    if key is None:
        return
    value = key.get_secret_value()
    if value.count(".") != 2:
        return
    try:
        claims = jwt.decode(value, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return
    role = claims.get("role")
    if role is not None and role != "service_role":
        raise ConfigurationError(
            f"SUPABASE_SERVICE_KEY is a key with role {str(role)[:40]!r}, not the service_role "
            "key (Project Settings → API → service_role): storage refuses it every write"
        )


def masked_url(url: str) -> str:
    """``url`` with the password of its user part (``//user:password@``) shown as ``****``:
    what an error may print. Done on the text, since a URL in error may not parse."""
    head, sep, rest = url.partition("//")
    if not sep:
        head, rest = "", url
    # The last "@": a password typed unencoded may hold "@" or "/" itself.
    at = rest.rfind("@")
    if at < 0:
        return url
    user, colon, _ = rest[:at].partition(":")
    return f"{head}{sep}{user}{':****' if colon else ''}{rest[at:]}"


def _split_secrets(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
