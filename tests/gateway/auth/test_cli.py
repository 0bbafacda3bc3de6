"""`vllm-gateway create-admin` in a subprocess: creates or promotes an admin that can log in."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.app import TEST_SECRET
from tests.helpers.auth import (
    USER_PASSWORD,
    ResponseLog,
    assert_openai_error,
    auth_app,
    auth_settings,
    bearer,
    create_user,
    login,
)

CLI_PASSWORD = "cli-made-admin-pass-7781"


async def _create_admin(
    url: str, cwd: Path, username: str, password: str
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "ENVIRONMENT": "production",
        "JWT_SECRET": TEST_SECRET,
        "DATABASE_URL": url,
        "LOG_FORMAT": "json",
    }
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "create-admin", "--username", username,
         "--password-stdin"],
        input=password + "\n", capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
        check=False,
    )  # fmt: skip


async def test_create_admin_then_promote(
    pg_url: str, tmp_path: Path, response_log: ResponseLog
) -> None:
    created = await _create_admin(pg_url, tmp_path, "ops", CLI_PASSWORD)
    assert created.returncode == 0, created.stderr
    assert "admin 'ops' created" in created.stderr
    assert CLI_PASSWORD not in created.stdout + created.stderr

    settings = auth_settings(pg_url, ADMIN_PASSWORD=None)
    async with auth_app(settings, response_log) as (_, client):
        ops = await login(client, "ops", CLI_PASSWORD, path="/admin/api/login")
        me = (await client.get("/api/auth/me", headers=bearer(ops["access_token"]))).json()
        await create_user(client, ops["access_token"], "frank")
        frank = await login(client, "frank", USER_PASSWORD)

        promoted = await _create_admin(pg_url, tmp_path, "frank", CLI_PASSWORD)
        old_session = await client.get("/api/auth/me", headers=bearer(frank["access_token"]))
        old_password = await client.post(
            "/api/auth/login", json={"username": "frank", "password": USER_PASSWORD}
        )
        await login(client, "frank", CLI_PASSWORD, path="/admin/api/login")
    assert me["role"] == "admin"
    assert promoted.returncode == 0, promoted.stderr
    assert "admin 'frank' updated" in promoted.stderr
    assert_openai_error(old_session, 401, "invalid_token")
    assert_openai_error(old_password, 401, "invalid_credentials")


async def test_create_admin_refuses_short_passwords(pg_url: str, tmp_path: Path) -> None:
    result = await _create_admin(pg_url, tmp_path, "ops", "short")
    assert result.returncode != 0
    assert "password needs" in result.stderr
    bad_name = await _create_admin(pg_url, tmp_path, "bad name", CLI_PASSWORD)
    assert bad_name.returncode != 0
