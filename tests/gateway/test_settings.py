"""Settings: secrets policy, seed variable names, URL normalisation, the CLI's refusal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from gateway.settings import Environment, Settings
from tests.helpers.app import TEST_SECRET


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        (None, "not set"),
        ("short-but-random-Zx81", "shorter than 32 bytes"),
        ("your-super-secret-jwt-key-that-is-long-enough", "placeholder"),
        (
            "dev-jwt-secret-key-for-vllm-gateway-development-only-change-in-production",
            "placeholder",
        ),
        ("a" * 64, "placeholder"),
    ],
)
def test_production_refuses_weak_jwt_secret(secret: str | None, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        _settings(ENVIRONMENT="production", JWT_SECRET=secret)
    assert reason in str(info.value)


def test_production_accepts_strong_secret() -> None:
    settings = _settings(ENVIRONMENT="production", JWT_SECRET=TEST_SECRET)
    assert settings.JWT_SECRET is not None
    assert settings.JWT_SECRET.get_secret_value() == TEST_SECRET
    assert settings.jwt_secret_generated is False


def test_development_generates_a_secret_and_flags_it() -> None:
    first = _settings(ENVIRONMENT="development")
    second = _settings(ENVIRONMENT="development")
    assert first.jwt_secret_generated
    assert first.JWT_SECRET is not None
    assert second.JWT_SECRET is not None
    assert len(first.JWT_SECRET.get_secret_value()) >= 32
    assert first.JWT_SECRET.get_secret_value() != second.JWT_SECRET.get_secret_value()


@pytest.mark.parametrize("weak", ["short-secret", "changeme-" + "x" * 40])
def test_development_replaces_a_weak_secret_and_says_why(weak: str) -> None:
    settings = _settings(ENVIRONMENT="development", JWT_SECRET=weak)
    assert settings.JWT_SECRET is not None
    assert settings.JWT_SECRET.get_secret_value() != weak
    assert len(settings.JWT_SECRET.get_secret_value()) >= 32
    assert settings.jwt_secret_generated
    assert settings.jwt_secret_problem is not None
    assert "JWT_SECRET" in settings.jwt_secret_problem


def test_defaults_are_loopback_8080_and_embedded_sqlite() -> None:
    settings = _settings(ENVIRONMENT="development")
    assert (settings.HOST, settings.PORT) == ("127.0.0.1", 8080)
    assert settings.is_sqlite
    assert settings.REDIS_URL is None
    assert settings.ENVIRONMENT is Environment.DEVELOPMENT


def test_seed_variable_names_and_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "ENVIRONMENT": "production",
        "JWT_SECRET": TEST_SECRET,
        "JWT_ALGORITHM": "HS512",
        "JWT_EXPIRE_HOURS": "12",
        "CORS_ORIGINS": '["http://localhost:3000"]',
        "LOG_LEVEL": "debug",
        "VLLM_BASE_URL": "http://localhost:8000/v1",
        "DATABASE_URL": "postgresql://chatuser:pw@localhost:5432/chatdb",
        "REDIS_URL": "redis://localhost:6379/0",
        "OPENAI_API_KEY": "sk-test-not-real",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert settings.JWT_ALGORITHM == "HS512"
    assert settings.JWT_EXPIRE_HOURS == 12
    assert settings.CORS_ORIGINS == ["http://localhost:3000"]
    assert settings.LOG_LEVEL == "DEBUG"
    assert settings.VLLM_BASE_URL == "http://localhost:8000/v1"
    assert settings.DATABASE_URL == "postgresql+asyncpg://chatuser:pw@localhost:5432/chatdb"
    assert settings.REDIS_URL == "redis://localhost:6379/0"
    assert settings.OPENAI_API_KEY is not None
    assert "sk-test" not in repr(settings)


def test_cors_origins_accepts_comma_separated_list() -> None:
    settings = _settings(ENVIRONMENT="development", CORS_ORIGINS="http://a.test, http://b.test")
    assert settings.CORS_ORIGINS == ["http://a.test", "http://b.test"]


def test_unknown_log_level_is_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown log level"):
        _settings(ENVIRONMENT="development", LOG_LEVEL="LOUD")


def test_cli_refuses_to_start_without_echoing_the_secret() -> None:
    placeholder = "your-super-secret-jwt-key-please-change-me-now"
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"ENVIRONMENT", "JWT_SECRET"}},
        "JWT_SECRET": placeholder,
        "ENVIRONMENT": "production",
    }
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "refusing to start" in result.stderr
    assert "placeholder" in result.stderr
    assert placeholder not in result.stderr + result.stdout
    assert "your-super" not in result.stderr


def test_cli_accepts_valid_configuration() -> None:
    env = {**os.environ, "ENVIRONMENT": "production", "JWT_SECRET": TEST_SECRET}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "configuration is valid (production)" in result.stdout


def test_trusted_proxies_take_addresses_and_networks() -> None:
    settings = _settings(ENVIRONMENT="development", TRUSTED_PROXIES="10.0.0.0/8, 127.0.0.1, ::1")
    assert settings.is_trusted_proxy("10.20.30.40")
    assert settings.is_trusted_proxy("127.0.0.1")
    assert settings.is_trusted_proxy("::1")
    assert not settings.is_trusted_proxy("11.0.0.1")
    assert not settings.is_trusted_proxy("not-an-ip")
    assert not _settings(ENVIRONMENT="development").is_trusted_proxy("127.0.0.1")


def test_a_trusted_proxy_that_is_no_address_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        _settings(ENVIRONMENT="development", TRUSTED_PROXIES="proxy.internal")
    assert "proxy.internal" in str(info.value)
