"""The other engine routes clients call: /v1/rerank, /v1/score, /tokenize, /detokenize and the
multipart /v1/audio/transcriptions; authenticated, limited, relayed to engines that serve them,
refused with a clear error for an engine that does not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from simulator.text import FIRST_TEXT
from tests.helpers.proxy import ADMIN_KEY, AUTH, Gateway, gateway, gateway_settings, sim_profile

USER_AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
# A few bytes standing for an audio file: the simulator transcribes anything.
AUDIO = b"RIFF" + bytes(range(256)) * 8


@pytest.fixture(scope="module")
async def gw() -> AsyncIterator[Gateway]:
    profiles = {
        "sim-a": sim_profile("sim-a"),
        # Serves only chat, completions and embeddings (its profile lists no other API).
        "sim-c": sim_profile("sim-c", apis=()),
        # Its profile claims every API, but the engine lacks rerank: the engine's own 404
        # comes back as it answered (marked as the upstream's).
        "sim-d": sim_profile("sim-d", "--without-api", "rerank"),
    }
    settings = gateway_settings(profiles, "sim-a", REQUIRE_AUTH=True)
    async with gateway(settings) as served:
        for profile in ("sim-c", "sim-d"):
            loaded = await served.http.post(f"/api/models/{profile}/load", headers=AUTH)
            assert loaded.status_code == 202, loaded.text
            await served.wait_ready(profile)
        yield served


async def post(gw: Gateway, path: str, body: dict[str, Any]) -> Any:
    response = await gw.http.post(path, json=body, headers=USER_AUTH)
    assert response.status_code == 200, response.text
    return response.json()


async def test_tokenize_and_detokenize_round_trip(gw: Gateway) -> None:
    # Words of the simulator's vocabulary: its ids for other words are their bytes, past the
    # largest token id the gateway relays (no real vocabulary has 2^31 tokens).
    words = " ".join(FIRST_TEXT[:3])
    tokens = await post(gw, "/tokenize", {"model": "sim-a", "prompt": words})
    assert tokens["count"] == len(tokens["tokens"]) == 3
    text = await post(gw, "/detokenize", {"model": "sim-a", "tokens": tokens["tokens"]})
    assert text["prompt"] == words


async def test_tokenize_chat_messages(gw: Gateway) -> None:
    short = await post(gw, "/tokenize", {"model": "sim-a", "prompt": "hi"})
    chat = await post(
        gw,
        "/tokenize",
        {"model": "sim-a", "messages": [{"role": "user", "content": "hi there, how are you?"}]},
    )
    assert chat["count"] > short["count"]


async def test_rerank_orders_documents(gw: Gateway) -> None:
    documents = ["a car on a road", "a cat on a mat", "the cat sat on the mat"]
    ranked = await post(
        gw,
        "/v1/rerank",
        {"model": "sim-a", "query": "cat on the mat", "documents": documents, "top_n": 2},
    )
    results = ranked["results"]
    assert len(results) == 2
    scores = [result["relevance_score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    assert documents[results[0]["index"]] != "a car on a road"


async def test_score(gw: Gateway) -> None:
    scored = await post(
        gw, "/v1/score", {"model": "sim-a", "text_1": "cat", "text_2": ["a cat", "a car"]}
    )
    assert [item["index"] for item in scored["data"]] == [0, 1]
    assert all(isinstance(item["score"], float) for item in scored["data"])


async def test_transcription_with_the_openai_sdk(gw: Gateway) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=ADMIN_KEY, max_retries=0) as sdk:
        transcript = await sdk.audio.transcriptions.create(
            model="sim-a", file=("clip.wav", AUDIO, "audio/wav")
        )
    assert transcript.text


async def test_transcription_needs_a_file_and_multipart(gw: Gateway) -> None:
    no_file = await gw.http.post(
        "/v1/audio/transcriptions", data={"model": "sim-a"}, files={}, headers=USER_AUTH
    )
    assert no_file.status_code in (400, 415), no_file.text
    as_json = await gw.http.post(
        "/v1/audio/transcriptions", json={"model": "sim-a"}, headers=USER_AUTH
    )
    assert as_json.status_code == 415, as_json.text
    assert as_json.json()["error"]["code"] == "unsupported_media_type"
    missing = await gw.http.post(
        "/v1/audio/transcriptions",
        data={"model": "sim-a"},
        files={"other": ("x.txt", b"x", "text/plain")},
        headers=USER_AUTH,
    )
    assert missing.status_code == 400, missing.text
    assert missing.json()["error"]["param"] == "file"


async def test_transcription_over_the_audio_cap_is_413(gw: Gateway) -> None:
    cap = gw.app.state.resources.settings.MAX_AUDIO_BYTES
    response = await gw.http.post(
        "/v1/audio/transcriptions",
        data={"model": "sim-a"},
        files={"file": ("big.wav", b"\0" * (cap + 1), "audio/wav")},
        headers=USER_AUTH,
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"model": "sim-c", "prompt": "hi"}),
        ("/detokenize", {"model": "sim-c", "tokens": [1, 2]}),
        ("/v1/rerank", {"model": "sim-c", "query": "q", "documents": ["d"]}),
        ("/v1/score", {"model": "sim-c", "text_1": "a", "text_2": "b"}),
    ],
)
async def test_an_engine_that_does_not_serve_a_route_is_a_clear_400(
    gw: Gateway, path: str, body: dict[str, Any]
) -> None:
    response = await gw.http.post(path, json=body, headers=USER_AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "route_not_served"
    assert path in error["message"]
    assert response.headers["x-error-source"] == "gateway"


async def test_an_engine_that_lacks_a_route_it_claims_answers_for_itself(gw: Gateway) -> None:
    response = await gw.http.post(
        "/v1/rerank", json={"model": "sim-d", "query": "q", "documents": ["d"]}, headers=USER_AUTH
    )
    assert response.status_code == 404
    assert response.headers["x-error-source"] == "upstream"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"model": "sim-a"}, "prompt"),
        ("/detokenize", {"model": "sim-a", "tokens": []}, "tokens"),
        ("/detokenize", {"model": "sim-a", "tokens": [-1]}, "tokens"),
        ("/v1/rerank", {"model": "sim-a", "query": "q", "documents": []}, "documents"),
        ("/v1/rerank", {"model": "sim-a", "documents": ["d"]}, "query"),
        ("/v1/score", {"model": "sim-a", "text_1": "a"}, "text_1"),
    ],
)
async def test_bad_requests_name_the_field(
    gw: Gateway, path: str, body: dict[str, Any], param: str
) -> None:
    response = await gw.http.post(path, json=body, headers=USER_AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "path", ["/tokenize", "/detokenize", "/v1/rerank", "/v1/score", "/v1/audio/transcriptions"]
)
async def test_credentials_are_required(gw: Gateway, path: str) -> None:
    response = await gw.http.post(path, json={"model": "sim-a"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
