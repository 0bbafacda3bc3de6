"""Gateway settings: one pydantic-settings class, read once at startup and passed in."""

from __future__ import annotations

import json
import secrets
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

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


class Environment(StrEnum):
    """Where the gateway runs; development relaxes secret checks and prints readable logs."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class EngineMode(StrEnum):
    """How the gateway finds its inference engine at startup."""

    AUTO = "auto"  # VLLM_BASE_URL if set, else the simulator when no GPU is found
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

    JWT_SECRET: SecretStr | None = None
    JWT_ALGORITHM: str = "HS256"
    JWT_EXPIRE_HOURS: int = Field(default=24, ge=1)

    CORS_ORIGINS: Annotated[list[str], NoDecode] = Field(default_factory=list)
    LOG_LEVEL: str = "INFO"
    LOG_FORMAT: LogFormat = LogFormat.AUTO

    ENGINE: EngineMode = EngineMode.AUTO
    VLLM_BASE_URL: str | None = None
    VLLM_API_KEY: SecretStr | None = None
    MODEL_PROFILES: Path = Path("model_profiles.yml")
    DEFAULT_PROFILE: str | None = None
    GPU_SNAPSHOT: Path | None = None
    INSTANCE_NAME: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    STATE_DIR: Path = Path("var")
    VLLM_PYTHON: str | None = None
    HF_CACHE: str = "vcg-hf-cache"
    HF_TOKEN: SecretStr | None = None
    DRAIN_TIMEOUT_S: float = Field(default=30.0, ge=0)
    ENGINE_STARTUP_TIMEOUT_S: float | None = Field(default=None, gt=0)
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
    CLOUD_MODEL: str = "gpt-4o-mini"
    CLOUD_MODEL_MAP: dict[str, str] = Field(default_factory=dict)

    # Proxy timeouts (per route) and caps on what one request may ask for.
    CHAT_TIMEOUT_S: float = Field(default=600.0, gt=0)
    COMPLETIONS_TIMEOUT_S: float = Field(default=600.0, gt=0)
    EMBEDDINGS_TIMEOUT_S: float = Field(default=120.0, gt=0)
    STREAM_IDLE_TIMEOUT_S: float = Field(default=60.0, gt=0)
    MAX_N: int = Field(default=8, ge=1)
    MAX_TOKENS_CAP: int = Field(default=32768, ge=1)
    MAX_BODY_BYTES: int = Field(default=4 * 1024 * 1024, ge=1024)
    MAX_HEADER_BYTES: int = Field(default=32 * 1024, ge=1024)

    # Set when development mode had to make a secret up; logged once at startup.
    jwt_secret_generated: bool = Field(default=False, exclude=True)
    admin_key_generated: bool = Field(default=False, exclude=True)

    @field_validator("CORS_ORIGINS", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        """Accept a JSON list (as in the seeds) or a comma-separated string."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

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
    def _check_secrets(self) -> Settings:
        """Refuse a missing, short or placeholder JWT secret outside development."""
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
            if not secret:
                self.JWT_SECRET = SecretStr(secrets.token_urlsafe(48))
                self.jwt_secret_generated = True
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
