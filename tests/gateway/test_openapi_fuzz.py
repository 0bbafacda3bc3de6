"""Schemathesis over /openapi.json: every operation, every check, zero failures.

The real CLI (as an operator would run it) against a real gateway: a simulator engine behind it,
authentication on, once with an admin's credentials and once with a normal user's (the admin
operations then answer 403, and the rest is that user's own data), on PostgreSQL and on the
embedded SQLite. The checks include `ignored_auth` (each secured operation is also sent without
credentials and must answer 401), server errors (any 5xx fails), response bodies and status
codes against the document, `Allow` on 405, and the stateful phase that chains the operations'
links (create a user, a key, a conversation; read, change and delete them). With
`positive_data_acceptance` and `negative_data_rejection` both on, the document says exactly
what the validators enforce: every request it allows is accepted, every one it forbids refused.

Left out, with the reason:
- three refusals of schema-valid requests, for rules no schema can state: an `expires_at`
  that is not in the future (400 invalid_expiry: a schema has no "now"), a `messages` list
  whose last item is not a user message with text (400 invalid_last_message: JSON Schema has
  no "last item") and an Idempotency-Key sent before with another body (422
  idempotency_key_reused: it depends on earlier requests). openapi_fuzz_hooks.py drops those
  ST202 failures, and only when the error names the rule by its code on an operation that
  has it; every other refusal of a schema-valid request fails the run;
- `GET /api/models/events` (an SSE stream that ends only when the client leaves),
  `POST /api/models/switch`, `POST /api/models/reload` and the fleet's
  `POST /api/models/{profile_id}/load|unload|sleep|wake` (they change which engines run;
  requests for a model that is loading answer 503 with Retry-After, which is right but a
  5xx): tests/gateway/models_api covers them;
- `POST /api/auth/logout`: it would end the session whose token the run uses
  (tests/gateway/auth covers it).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest

from gateway.migrate import upgrade
from tests.helpers.proxy import gateway, gateway_settings, sim_profile

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
HOOKS = Path(__file__).with_name("openapi_fuzz_hooks.py")
EXCLUDED_PATHS = (
    "/api/models/events",
    "/api/models/switch",
    "/api/models/reload",
    "/api/models/{profile_id}/load",
    "/api/models/{profile_id}/unload",
    "/api/models/{profile_id}/sleep",
    "/api/models/{profile_id}/wake",
    "/api/auth/logout",
)
ADMIN = "fuzz-admin"
ADMIN_PASSWORD = "fuzz-Admin-passw0rd-7c1e9b"


USER = "fuzz-user"
USER_PASSWORD = "fuzz-User-passw0rd-3a8d2f"


async def _token(http: httpx.AsyncClient, username: str, password: str) -> str:
    login = await http.post("/api/auth/login", json={"username": username, "password": password})
    assert login.status_code == 200, login.text
    return str(login.json()["access_token"])


async def _fuzz(database_url: str, tmp_path: Path, caller: str) -> None:
    settings = gateway_settings(
        {"sim-a": sim_profile("sim-a", aliases=("model-a",))},
        "sim-a",
        DATABASE_URL=database_url,
        REQUIRE_AUTH=True,
        # Small caps keep generated requests cheap for the simulator.
        MAX_TOKENS_CAP=32,
        MAX_N=2,
        ADMIN_USERNAME=ADMIN,
        ADMIN_PASSWORD=ADMIN_PASSWORD,
    )
    async with gateway(settings) as gw:
        token = await _token(gw.http, ADMIN, ADMIN_PASSWORD)
        if caller == "user":
            # A normal user: the admin operations answer 403, everything else is that user's.
            created = await gw.http.post(
                "/admin/api/users",
                json={"username": USER, "password": USER_PASSWORD},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert created.status_code == 201, created.text
            token = await _token(gw.http, USER, USER_PASSWORD)
        command = [
            str(SCHEMATHESIS),
            "run",
            f"{gw.url}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {token}",
            "--max-examples",
            # A deeper or differently seeded run: VCG_FUZZ_EXAMPLES=100 VCG_FUZZ_SEED=7 ...
            os.environ.get("VCG_FUZZ_EXAMPLES", "12"),
            "--workers",
            "1",
            "--seed",
            os.environ.get("VCG_FUZZ_SEED", "20261201"),
            "--request-timeout",
            "30",
            "--no-color",
            *(arg for path in EXCLUDED_PATHS for arg in ("--exclude-path", path)),
        ]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=600)
    text = output.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(text)
    assert process.returncode == 0, text[-20_000:]
    # The run did test the API (not an empty selection or a document it could not load).
    assert "Tested:" in text
    assert "No issues found" in text or " passed" in text


CALLERS = pytest.mark.parametrize("caller", ["admin", "user"])


@pytest.mark.postgres
@CALLERS
async def test_schemathesis_on_postgres(postgres_url: str, tmp_path: Path, caller: str) -> None:
    await asyncio.to_thread(upgrade, postgres_url)
    await _fuzz(postgres_url, tmp_path, caller)


@CALLERS
async def test_schemathesis_on_sqlite(tmp_path: Path, caller: str) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    await asyncio.to_thread(upgrade, url)
    await _fuzz(url, tmp_path, caller)
