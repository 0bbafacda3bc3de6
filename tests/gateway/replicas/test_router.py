"""/internal/fleet/* takes the fleet token (derived from JWT_SECRET) and nothing else, and does
nothing on a gateway without replicas."""

from __future__ import annotations

from gateway.replicas.token import HEADER, fleet_token
from tests.helpers.app import make_settings, running_app

JOB = {"kind": "load", "profile_id": "simulator"}


async def test_the_fleet_token_is_the_only_credential_and_a_lone_gateway_has_no_fleet(
    sqlite_url: str,
) -> None:
    settings = make_settings(DATABASE_URL=sqlite_url, ADMIN_API_KEY="sk-admin-" + "x" * 32)
    async with running_app(settings) as (_, client):
        for headers in (
            {},
            {HEADER: "0" * 64},
            {"Authorization": "Bearer sk-admin-" + "x" * 32},  # an admin is not a replica
        ):
            response = await client.post("/internal/fleet/jobs", json=JOB, headers=headers)
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_fleet_token"
            assert response.headers["www-authenticate"].startswith("Bearer")
        token = {HEADER: fleet_token(settings)}
        response = await client.post("/internal/fleet/jobs", json=JOB, headers=token)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_replicated"
        response = await client.get("/internal/fleet/jobs/abc", headers=token)
        assert response.json()["error"]["code"] == "not_replicated"
        # Nothing of the body is read on a gateway without replicas.
        response = await client.post(
            "/internal/fleet/jobs", json={"kind": "explode", "profile_id": "x"}, headers=token
        )
        assert response.json()["error"]["code"] == "not_replicated"


def test_the_token_depends_on_the_secret() -> None:
    one = fleet_token(make_settings(JWT_SECRET="q7Hc2Lx9Vb4Nk8Rt1Wm6Zp3Sd5Fg0Jy-" * 2))
    other = fleet_token(make_settings(JWT_SECRET="Xe4Tn8Qa1Mv5Kc9Bw2Ry6Lp0Hd3Gs7Uj_" * 2))
    assert one != other
    assert len(one) == 64
