"""Gateway settings: one pydantic-settings class, read once at startup and passed in."""

from __future__ import annotations

import ipaddress
import json
import secrets
from enum import StrEnum
from functools import cached_property
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIN_JWT_SECRET_BYTES = 32

# Fragments of well-known example secrets (including the seeds' own examples): a secret that
# contains one of them was copied from documentation and must not guard a real deployment.
_PLACEHOLDER_FRAGMENTS = (
    "change",
    "your-",
    "your_",
    "placeholder",
    "example",
    "secret-key",
    "secret_key",
    "dev-jwt-secret",
    "development-only",
    "xxxx",
)


# The engine routes by name (gateway.proxy.validation.Route's values).
CloudRoute = Literal[
    "chat",
    "completions",
    "embeddings",
    "responses",
    "messages",
    "count_tokens",
    "rerank",
    "score",
    "transcriptions",
]


def _openai_cloud_routes() -> list[CloudRoute]:
    return ["chat", "completions", "embeddings", "responses"]


class Environment(StrEnum):
    """Where the gateway runs; development relaxes secret checks and prints readable logs."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class EngineMode(StrEnum):
    """How the gateway finds its inference engine at startup."""

    # VLLM_BASE_URL if set, else the default profile if it fits; else no engine (the simulator
    # stands in only in development).
    AUTO = "auto"
    SIMULATOR = "simulator"
    EXTERNAL = "external"
    NONE = "none"


class LogFormat(StrEnum):
    """Log renderer: JSON lines for machines, console for people."""

    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


def _is_placeholder(secret: str) -> bool:
    lowered = secret.lower()
    return any(fragment in lowered for fragment in _PLACEHOLDER_FRAGMENTS) or len(set(secret)) < 8


def normalize_database_url(url: str) -> str:
    """Map sync driver URLs (as written in the seeds) to their async drivers."""
    for sync_prefix, async_prefix in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql+psycopg2://", "postgresql+asyncpg://"),
    ):
        if url.startswith(sync_prefix):
            return async_prefix + url[len(sync_prefix) :]
    return url


class Settings(BaseSettings):
    """Every setting of the gateway; environment variables use the names shown here."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=True
    )

    APP_NAME: str = "vLLM Chat Gateway"
    ENVIRONMENT: Environment = Environment.PRODUCTION
    HOST: str = "127.0.0.1"
    PORT: int = Field(default=8080, ge=0, le=65535)

    DATABASE_URL: str = "sqlite+aiosqlite:///./var/gateway.db"
    DATABASE_POOL_SIZE: int = Field(default=10, ge=1)
    AUTO_MIGRATE: bool = True
    REDIS_URL: str | None = None
    # False: with Redis down the gateway stays ready (200, "degraded"): inference limits run per
    # process and login/admin answer 503. True: readiness is 503 while Redis is down.
    REDIS_REQUIRED: bool = False

    JWT_SECRET: SecretStr | None = None
    JWT_ALGORITHM: str = "HS256"
    JWT_EXPIRE_HOURS: int = Field(default=1, ge=1, le=24 * 7)
    JWT_REFRESH_DAYS: int = Field(default=14, ge=1, le=365)
    JWT_ISSUER: str = "vllm-chat-gateway"
    JWT_AUDIENCE: str = "vllm-chat-gateway"
    JWT_LEEWAY_S: int = Field(default=30, ge=0, le=60)
    # RS*/ES*/EdDSA: PEM files; the private key is needed only to issue tokens.
    JWT_PRIVATE_KEY_FILE: Path | None = None
    JWT_PUBLIC_KEY_FILE: Path | None = None

    # Identity: the first admin, and whether /v1 and /api need credentials at all.
    ADMIN_USERNAME: str = "admin"
    ADMIN_PASSWORD: SecretStr | None = None
    REQUIRE_AUTH: bool = True
    API_KEY_PREFIX: str = Field(default="sk-vcg-", pattern=r"^sk-[a-z0-9-]{0,16}$")
    # Client IPs are read from X-Forwarded-For only when the peer is one of these proxies.
    TRUSTED_PROXIES: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Rate limits per tier (seed names) and per IP for routes without credentials.
    RATE_LIMIT_FREE_PER_MINUTE: int = Field(default=10, ge=0)
    RATE_LIMIT_FREE_PER_HOUR: int = Field(default=100, ge=0)
    RATE_LIMIT_STANDARD_PER_MINUTE: int = Field(default=30, ge=0)
    RATE_LIMIT_STANDARD_PER_HOUR: int = Field(default=300, ge=0)
    RATE_LIMIT_PREMIUM_PER_MINUTE: int = Field(default=100, ge=0)
    RATE_LIMIT_PREMIUM_PER_HOUR: int = Field(default=1000, ge=0)
    RATE_LIMIT_FREE_TOKENS_PER_MINUTE: int = Field(default=10_000, ge=0)
    RATE_LIMIT_STANDARD_TOKENS_PER_MINUTE: int = Field(default=50_000, ge=0)
    RATE_LIMIT_PREMIUM_TOKENS_PER_MINUTE: int = Field(default=200_000, ge=0)
    RATE_LIMIT_REQUESTS: int = Field(default=100, ge=0)
    RATE_LIMIT_WINDOW: int = Field(default=3600, ge=1)
    LOGIN_RATE_LIMIT_PER_MINUTE: int = Field(default=10, ge=1)
    # Per IP on /api/auth/refresh and /api/auth/logout (one budget), and per caller on the admin
    # API; like login, they fail closed (503) while Redis is down.
    SESSION_RATE_LIMIT_PER_MINUTE: int = Field(default=60, ge=1)
    ADMIN_RATE_LIMIT_PER_MINUTE: int = Field(default=600, ge=1)
    LIMITER_FALLBACK_WARN_INTERVAL_S: float = Field(default=60.0, gt=0)

    # Usage records are written in batches off the request path.
    # False: no usage rows (no /admin/api/usage figures); token limits are counted regardless.
    USAGE_ENABLED: bool = True
    USAGE_FLUSH_INTERVAL_S: float = Field(default=1.0, gt=0)
    USAGE_BATCH_SIZE: int = Field(default=500, ge=1)
    # Raw usage rows are kept this many UTC days (today included), then rolled up into daily
    # totals (usage_daily) and deleted, in batches by a background task; 0 keeps them forever.
    USAGE_RETENTION_DAYS: int = Field(default=90, ge=0, le=36500)
    USAGE_PRUNE_INTERVAL_S: float = Field(default=3600.0, gt=0)
    USAGE_PRUNE_BATCH_SIZE: int = Field(default=1000, ge=1, le=2000)

    CORS_ORIGINS: Annotated[list[str], NoDecode] = Field(default_factory=list)
    LOG_LEVEL: str = "INFO"
    LOG_FORMAT: LogFormat = LogFormat.AUTO
    # Prometheus: GET /metrics. Without METRICS_TOKEN it answers only to loopback peers.
    METRICS_ENABLED: bool = True
    METRICS_TOKEN: SecretStr | None = None
    METRICS_GPU_INTERVAL_S: float = Field(default=15.0, gt=0)

    ENGINE: EngineMode = EngineMode.AUTO
    VLLM_BASE_URL: str | None = None
    VLLM_API_KEY: SecretStr | None = None
    MODEL_PROFILES: Path = Path("model_profiles.yml")
    DEFAULT_PROFILE: str | None = None
    GPU_SNAPSHOT: Path | None = None
    # A Ray cluster to join as a driver (`ray start --head` on this box, `ray start
    # --address=...` on the others): every node with GPUs becomes a place for engines, each
    # engine a detached Ray actor on its node. Unset: one host (GPU_SNAPSHOT or NVML here).
    RAY_ADDRESS: str | None = Field(
        default=None, pattern=r"^(auto|[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5})$"
    )
    INSTANCE_NAME: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    # Gateway replicas (RAY_ADDRESS and PostgreSQL): the URL the other replicas reach this one
    # at (they send it fleet operations while it leads); default http://HOST:PORT. How often
    # a follower tries to take the lead, and a leader checks it still holds it.
    REPLICA_URL: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    FLEET_LEASE_INTERVAL_S: float = Field(default=1.0, gt=0, le=60)
    STATE_DIR: Path = Path("var")
    VLLM_PYTHON: str | None = None
    # The interpreter of the venv with llama-cpp-python's server (llama_cpp engines, process).
    LLAMA_CPP_PYTHON: str | None = None
    HF_CACHE: str = "vcg-hf-cache"
    HF_TOKEN: SecretStr | None = None
    DRAIN_TIMEOUT_S: float = Field(default=30.0, ge=0)
    ENGINE_STARTUP_TIMEOUT_S: float | None = Field(default=None, gt=0)
    # An engine that dies on its own is restarted after a backoff (doubling per crash, capped),
    # at most ENGINE_RESTART_MAX times within ENGINE_RESTART_WINDOW_S; one crash more is a crash
    # loop and it stays failed. 0 turns restarts off.
    ENGINE_RESTART_MAX: int = Field(default=3, ge=0, le=100)
    ENGINE_RESTART_WINDOW_S: float = Field(default=600.0, gt=0)
    ENGINE_RESTART_BACKOFF_S: float = Field(default=2.0, ge=0)
    ENGINE_RESTART_BACKOFF_MAX_S: float = Field(default=60.0, ge=0)
    UPSTREAM_CONNECT_TIMEOUT_S: float = Field(default=5.0, gt=0)
    UPSTREAM_READ_TIMEOUT_S: float = Field(default=300.0, gt=0)
    # Guards the model management API until user accounts exist (seed: ADMIN_API_KEY).
    ADMIN_API_KEY: SecretStr | None = None

    OPENAI_API_KEY: SecretStr | None = None
    OPENAI_BASE_URL: str = "https://api.openai.com/v1"

    # Load balancing (seed: load_balancing.max_queue_size = local concurrent requests).
    LB_ENABLED: bool = True
    MAX_QUEUE_SIZE: int = Field(default=4, ge=1)
    QUEUE_MAX_WAITING: int = Field(default=256, ge=0)
    QUEUE_TIMEOUT_S: float = Field(default=120.0, gt=0)
    OVERFLOW_SLO_S: float | None = Field(default=None, gt=0)
    AUTO_SWITCH: bool = False
    # The fleet: how many engines may be resident (awake) at once; GPU engines are bounded by
    # the GPUs' memory as well. 1 is one engine at a time (every load evicts the other).
    FLEET_MAX_ENGINES: int = Field(default=4, ge=1, le=64)
    # No thrash: requests for a resident model are served before a swap that would evict it,
    # but no request waits longer than this for a swap it needs.
    SWAP_MAX_WAIT_S: float = Field(default=30.0, gt=0)
    CLOUD_MODEL: str = "gpt-4o-mini"
    CLOUD_MODEL_MAP: dict[str, str] = Field(default_factory=dict)
    # The routes the cloud upstream speaks: only these overflow to it (OpenAI's API has no
    # Anthropic messages, rerank, score, tokenize; add "messages" for an upstream that has).
    CLOUD_ROUTES: list[CloudRoute] = Field(default_factory=_openai_cloud_routes)

    # Proxy timeouts (per route) and caps on what one request may ask for.
    CHAT_TIMEOUT_S: float = Field(default=600.0, gt=0)
    COMPLETIONS_TIMEOUT_S: float = Field(default=600.0, gt=0)
    EMBEDDINGS_TIMEOUT_S: float = Field(default=120.0, gt=0)
    STREAM_IDLE_TIMEOUT_S: float = Field(default=60.0, gt=0)
    MAX_N: int = Field(default=8, ge=1)
    MAX_TOKENS_CAP: int = Field(default=32768, ge=1)
    MAX_BODY_BYTES: int = Field(default=4 * 1024 * 1024, ge=1024)
    MAX_HEADER_BYTES: int = Field(default=32 * 1024, ge=1024)
    # POST /api/conversations/import takes a whole exported conversation: its own, larger cap.
    MAX_IMPORT_BYTES: int = Field(default=32 * 1024 * 1024, ge=1024)
    # An audio file for /v1/audio/transcriptions (OpenAI's own limit is 25 MB).
    MAX_AUDIO_BYTES: int = Field(default=25 * 1024 * 1024, ge=1024)
    # Nesting of a JSON body (every route). orjson re-serializes at most 254 levels, so the
    # ceiling stays below that: a deeper body would be accepted, then fail when relayed.
    MAX_JSON_DEPTH: int = Field(default=64, ge=8, le=200)
    # Request fields a tier may send beyond the default policy (gateway/fields.py), e.g.
    # "chat_template"; JSON list or comma-separated; routing fields are refused at startup.
    ALLOWED_FIELDS_FREE: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ALLOWED_FIELDS_STANDARD: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ALLOWED_FIELDS_PREMIUM: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Conversations and /api/chat.
    CHAT_DEFAULT_CONTEXT: int = Field(default=4096, ge=256)
    CHAT_RESERVED_REPLY_TOKENS: int = Field(default=512, ge=16)
    CHAT_BYTES_PER_TOKEN: float = Field(default=3.0, gt=0)
    CHAT_SAVE_INTERVAL_S: float = Field(default=2.0, gt=0)
    CHAT_STALE_AFTER_S: float = Field(default=300.0, gt=0)
    CHAT_SWEEP_INTERVAL_S: float = Field(default=60.0, gt=0)
    ADMIN_CAN_READ_CONVERSATIONS: bool = False

    # Set when development mode had to make a secret up; logged once at startup.
    jwt_secret_generated: bool = Field(default=False, exclude=True)
    jwt_secret_problem: str | None = Field(default=None, exclude=True)
    admin_key_generated: bool = Field(default=False, exclude=True)

    @field_validator(
        "CORS_ORIGINS",
        "TRUSTED_PROXIES",
        "ALLOWED_FIELDS_FREE",
        "ALLOWED_FIELDS_STANDARD",
        "ALLOWED_FIELDS_PREMIUM",
        mode="before",
    )
    @classmethod
    def _parse_lists(cls, value: Any) -> Any:
        """Accept a JSON list (as in the seeds) or a comma-separated string."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("TRUSTED_PROXIES")
    @classmethod
    def _proxy_networks(cls, value: list[str]) -> list[str]:
        """Each entry is an address or a network (CIDR); anything else is an error, not an
        entry that silently never matches."""
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"TRUSTED_PROXIES entry {entry!r} is not an IP address or network"
                ) from None
        return value

    @cached_property
    def trusted_proxy_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """TRUSTED_PROXIES parsed once."""
        return tuple(ipaddress.ip_network(entry, strict=False) for entry in self.TRUSTED_PROXIES)

    def is_trusted_proxy(self, address: str) -> bool:
        """True when `address` is one of TRUSTED_PROXIES or inside one of its networks."""
        if not self.TRUSTED_PROXIES:
            return False
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self.trusted_proxy_networks)

    @field_validator("OPENAI_BASE_URL")
    @classmethod
    def _http_base(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("OPENAI_BASE_URL must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("DATABASE_URL")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator("LOG_LEVEL")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> Settings:
        """REQUIRE_AUTH=false is for a single user on one machine, never on a network."""
        loopback = self.HOST in {"127.0.0.1", "localhost", "::1"}
        if not self.REQUIRE_AUTH and not loopback and not self.is_development:
            raise ValueError("REQUIRE_AUTH=false is only allowed with HOST on the loopback")
        return self

    @field_validator("JWT_ALGORITHM")
    @classmethod
    def _pinned_algorithm(cls, value: str) -> str:
        allowed = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "EdDSA"}
        if value not in allowed:
            raise ValueError(f"JWT_ALGORITHM must be one of {', '.join(sorted(allowed))}")
        return value

    @model_validator(mode="after")
    def _admin_key(self) -> Settings:
        """In development, make an admin key up when none is set (printed once at startup)."""
        if self.ADMIN_API_KEY is not None:
            if len(self.ADMIN_API_KEY.get_secret_value()) < 16:
                raise ValueError("ADMIN_API_KEY is shorter than 16 characters")
            return self
        if self.ENVIRONMENT is Environment.DEVELOPMENT:
            self.ADMIN_API_KEY = SecretStr("sk-admin-" + secrets.token_urlsafe(24))
            self.admin_key_generated = True
        return self

    @model_validator(mode="after")
    def _metrics_token(self) -> Settings:
        """A scrape token is a secret: long enough, and not copied from an example."""
        if self.METRICS_TOKEN is None:
            return self
        token = self.METRICS_TOKEN.get_secret_value()
        if len(token) < 16:
            raise ValueError("METRICS_TOKEN is shorter than 16 characters")
        if _is_placeholder(token) and not self.is_development:
            raise ValueError("METRICS_TOKEN looks like a placeholder copied from an example")
        return self

    @model_validator(mode="after")
    def _check_secrets(self) -> Settings:
        """Refuse a missing, short or placeholder JWT secret outside development."""
        if not self.JWT_ALGORITHM.startswith("HS"):
            if self.JWT_PUBLIC_KEY_FILE is None:
                raise ValueError(f"JWT_ALGORITHM={self.JWT_ALGORITHM} needs JWT_PUBLIC_KEY_FILE")
            return self
        secret = self.JWT_SECRET.get_secret_value() if self.JWT_SECRET else ""
        problem = None
        if not secret:
            problem = "JWT_SECRET is not set"
        elif len(secret.encode()) < MIN_JWT_SECRET_BYTES:
            problem = f"JWT_SECRET is shorter than {MIN_JWT_SECRET_BYTES} bytes"
        elif _is_placeholder(secret):
            problem = "JWT_SECRET looks like a placeholder copied from an example"
        if problem is None:
            return self
        if self.ENVIRONMENT is Environment.DEVELOPMENT:
            # A weak secret is replaced too, not kept: tokens signed with it could be forged
            # by anyone who guesses it. The startup log says why (jwt_secret_problem).
            self.JWT_SECRET = SecretStr(secrets.token_urlsafe(48))
            self.jwt_secret_generated = True
            self.jwt_secret_problem = problem
            return self
        raise ValueError(
            f"{problem}; set a random secret of at least {MIN_JWT_SECRET_BYTES} bytes "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`) "
            "or run with ENVIRONMENT=development"
        )

    @property
    def is_development(self) -> bool:
        """True when running in development mode."""
        return self.ENVIRONMENT is Environment.DEVELOPMENT

    @property
    def is_sqlite(self) -> bool:
        """True for the embedded SQLite database."""
        return self.DATABASE_URL.startswith("sqlite")

    @property
    def public_url(self) -> str:
        """The URL a person opens in a browser."""
        host = "127.0.0.1" if self.HOST in {"0.0.0.0", "::"} else self.HOST
        return f"http://{host}:{self.PORT}/"
