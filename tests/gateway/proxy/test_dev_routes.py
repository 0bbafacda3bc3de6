"""vLLM's development endpoints never reach an engine through the gateway.

An engine in sleep mode runs with VLLM_SERVER_DEV_MODE=1, which serves /sleep, /wake_up,
/collective_rpc, /reset_prefix_cache and more, none of them behind vLLM's key. The proxy
forwards only the OpenAI routes: each of those paths, at the root and under /v1/, in every
spelling a client might try, is the gateway's own 404 or 405, and the engine (a real simulator
process, which serves the same sleep contract) never hears of it.
"""

from __future__ import annotations

import httpx

from tests.helpers.proxy import AUTH, HELLO, gateway, gateway_settings, sim_profile

# vLLM's dev-mode routes (vllm/entrypoints/serve/dev/, profile/, elastic_ep/, rl/online/).
DEV_ROUTES = (
    "sleep",
    "wake_up",
    "is_sleeping",
    "collective_rpc",
    "reset_prefix_cache",
    "reset_mm_cache",
    "reset_encoder_cache",
    "release_kv_cache_memory",
    "server_info",
    "start_profile",
    "stop_profile",
    "scale_elastic_ep",
    "is_scaling_elastic_ep",
    "pause",
    "resume",
    "is_paused",
    "abort_requests",
    "init_weight_transfer_engine",
    "update_weights",
    "weight_info",
)
# Where a client might put them: the root, under /v1/, and spellings that a path-joining proxy
# could turn back into the engine's route.
SPELLINGS = ("/{}", "/v1/{}", "/{}/", "//{}", "/v1//{}", "/v1/%2e%2e/{}", "/v1/chat/../../{}")
BODIES = ({"method": "reload_weights"}, {"level": 2})


async def test_dev_mode_routes_are_the_gateways_404_and_never_reach_the_engine() -> None:
    settings = gateway_settings({"sleepy": sim_profile("sim")}, "sleepy")
    async with gateway(settings) as gw:
        engine_url = await gw.wait_ready()
        before = await gw.sim_stats(engine_url)
        answers: list[tuple[str, str, httpx.Response]] = []
        for route in DEV_ROUTES:
            for spelling in SPELLINGS:
                path = spelling.format(route)
                # Sent as written: httpx would otherwise resolve '..' and read '//x' as a host.
                url = httpx.URL(gw.url).copy_with(raw_path=f"{path}?level=1".encode())
                for headers in ({}, AUTH):
                    answers.append(("GET", path, await gw.http.get(url, headers=headers)))
                    for body in BODIES:
                        posted = await gw.http.post(url, json=body, headers=headers)
                        answers.append(("POST", path, posted))
        after = await gw.sim_stats(engine_url)
        async with httpx.AsyncClient(base_url=engine_url, headers=gw.engine_headers()) as engine:
            sleeping = (await engine.get("/is_sleeping")).json()
        served = await gw.http.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}
        )

    assert len(answers) == len(DEV_ROUTES) * len(SPELLINGS) * 2 * (1 + len(BODIES))
    for method, path, answer in answers:
        assert answer.status_code in (404, 405), (method, path, answer.status_code)
        assert answer.headers["x-error-source"] == "gateway", (method, path)
    # Nothing reached the engine: it is awake, and it saw no request.
    assert sleeping == {"is_sleeping": False}
    assert after["requests_total"] == before["requests_total"]
    assert after["sleep_level"] == 0
    assert served.status_code == 200, served.text
