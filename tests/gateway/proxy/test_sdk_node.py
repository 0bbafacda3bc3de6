"""The official Node `openai` SDK (npm, unchanged) against the gateway, simulator engine behind it.

Each test runs a small ES module with node (tests.helpers.node_clients): the SDK is pointed at
the gateway with `new OpenAI({baseURL: url + "/v1", apiKey})` and the script prints what it saw
as one JSON line. The gateway requires credentials here, so every call carries a key, as a
deployed client's does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers.node_clients import NodeClients
from tests.helpers.proxy import ADMIN_KEY, HELLO, Gateway, gateway, gateway_settings, sim_profile

# What each script starts with: the SDK on the gateway, without retries (every failure shows).
PRELUDE = """
import OpenAI, { APIError, AuthenticationError, NotFoundError } from "openai";

const client = new OpenAI({
  baseURL: process.env.GATEWAY_URL + "/v1",
  apiKey: process.env.API_KEY,
  maxRetries: 0,
});
const MESSAGES = JSON.parse(process.env.MESSAGES);
const print = (value) => console.log(JSON.stringify(value));
"""


@pytest.fixture(scope="module")
async def gw() -> AsyncIterator[Gateway]:
    profiles = {"sim-a": sim_profile("sim-a")}
    async with gateway(gateway_settings(profiles, "sim-a", REQUIRE_AUTH=True)) as served:
        yield served


async def run_sdk(
    node_clients: NodeClients, gw: Gateway, body: str, *, api_key: str = ADMIN_KEY
) -> dict[str, Any]:
    """Run PRELUDE + body against the gateway; return the JSON it prints last."""
    env = {"GATEWAY_URL": gw.url, "API_KEY": api_key, "MESSAGES": json.dumps(HELLO)}
    return await node_clients.run(PRELUDE + body, env, timeout_s=60)


# -- chat ----------------------------------------------------------------------------------------


async def test_chat_completion(node_clients: NodeClients, gw: Gateway) -> None:
    completion = await run_sdk(
        node_clients,
        gw,
        """
const completion = await client.chat.completions.create({
  model: "sim-a", messages: MESSAGES, max_tokens: 7, ignore_eos: true,
});
print(completion);
""",
    )
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "sim-a"
    choice = completion["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = completion["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7


async def test_chat_stream(node_clients: NodeClients, gw: Gateway) -> None:
    # `ignore_eos` is vLLM's sampling field: the SDK sends unknown body fields as they are.
    seen = await run_sdk(
        node_clients,
        gw,
        """
const stream = await client.chat.completions.create({
  model: "sim-a", messages: MESSAGES, max_tokens: 6, stream: true, ignore_eos: true,
});
const chunks = [];
for await (const chunk of stream) chunks.push(chunk);
print({
  objects: [...new Set(chunks.map((c) => c.object))],
  models: [...new Set(chunks.map((c) => c.model))],
  deltas: chunks.filter((c) => c.choices.length && c.choices[0].delta.content)
    .map((c) => c.choices[0].delta.content),
  finish_reasons: chunks.filter((c) => c.choices.length && c.choices[0].finish_reason)
    .map((c) => c.choices[0].finish_reason),
  usages: chunks.filter((c) => c.usage).map((c) => c.usage),
});
""",
    )
    assert seen["objects"] == ["chat.completion.chunk"]
    assert seen["models"] == ["sim-a"]
    assert len(seen["deltas"]) == 6
    assert seen["finish_reasons"] == ["length"]
    # The gateway asks the engine for usage (to count tokens) but hides that extra chunk.
    assert seen["usages"] == []


# -- errors --------------------------------------------------------------------------------------

# The SDK's error classes carry the gateway's envelope: status, error.code, error.type.
CATCH = """
try {
  await client.chat.completions.create({ model: MODEL, messages: MESSAGES, max_tokens: 2 });
  print({ thrown: false });
} catch (error) {
  if (!(error instanceof APIError)) throw error;
  print({
    thrown: true,
    class: error.constructor.name,
    not_found: error instanceof NotFoundError,
    authentication: error instanceof AuthenticationError,
    status: error.status,
    code: error.code,
    type: error.type,
    param: error.param,
    message: error.message,
    source: error.headers.get("x-error-source"),
  });
}
"""


async def test_unknown_model_is_a_not_found_error(node_clients: NodeClients, gw: Gateway) -> None:
    error = await run_sdk(node_clients, gw, 'const MODEL = "no-such-model";\n' + CATCH)
    assert error["thrown"] is True
    assert error["class"] == "NotFoundError"
    assert error["not_found"] is True
    assert error["status"] == 404
    assert error["code"] == "model_not_found"
    assert error["type"] == "not_found_error"
    assert error["param"] == "model"
    # The message names the models there are (an unknown name is not echoed back).
    assert error["message"].startswith("404 ")
    assert "sim-a" in error["message"]
    assert error["source"] == "gateway"


async def test_bad_key_is_an_authentication_error(node_clients: NodeClients, gw: Gateway) -> None:
    error = await run_sdk(
        node_clients, gw, 'const MODEL = "sim-a";\n' + CATCH, api_key="sk-vcg-not-a-real-key"
    )
    assert error["thrown"] is True
    assert error["class"] == "AuthenticationError"
    assert error["authentication"] is True
    assert error["status"] == 401
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "authentication_error"
    assert error["source"] == "gateway"


# -- responses -----------------------------------------------------------------------------------


async def test_responses_create(node_clients: NodeClients, gw: Gateway) -> None:
    response = await run_sdk(
        node_clients,
        gw,
        """
const response = await client.responses.create({
  model: "sim-a", input: "hello there", max_output_tokens: 16, ignore_eos: true,
});
// output_text is the SDK's own join of the message's output_text parts.
print({ ...response, sdk_output_text: response.output_text });
""",
    )
    assert response["object"] == "response"
    assert response["id"]
    assert response["model"] == "sim-a"
    assert response["status"] in ("completed", "incomplete")
    assert response["sdk_output_text"]
    messages = [item for item in response["output"] if item["type"] == "message"]
    assert messages
    assert messages[-1]["role"] == "assistant"
    usage = response["usage"]
    assert 0 < usage["output_tokens"] <= 16
    assert usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


async def test_responses_stream(node_clients: NodeClients, gw: Gateway) -> None:
    seen = await run_sdk(
        node_clients,
        gw,
        """
const stream = await client.responses.create({
  model: "sim-a", input: "hello there", max_output_tokens: 16, stream: true, ignore_eos: true,
});
const types = [];
const deltas = [];
let completed = null;
for await (const event of stream) {
  types.push(event.type);
  if (event.type === "response.output_text.delta") deltas.push(event.delta);
  if (event.type === "response.completed" || event.type === "response.incomplete") {
    completed = event.response;
  }
}
const finalText = completed === null ? null : completed.output
  .filter((item) => item.type === "message")
  .flatMap((item) => item.content)
  .filter((part) => part.type === "output_text")
  .map((part) => part.text)
  .join("");
print({ types, deltas, usage: completed && completed.usage, model: completed && completed.model,
  final_text: finalText });
""",
    )
    types = seen["types"]
    assert types[0] == "response.created"
    # The stream ends with response.completed; OpenAI's API ends a response cut short by
    # max_output_tokens with response.incomplete instead, which carries the same usage.
    terminal = [t for t in types if t in ("response.completed", "response.incomplete")]
    assert terminal == [types[-1]]
    assert seen["model"] == "sim-a"
    deltas = seen["deltas"]
    assert deltas
    assert "".join(deltas) == seen["final_text"]
    usage = seen["usage"]
    assert usage is not None
    assert len(deltas) <= usage["output_tokens"] <= 16
    assert usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


# -- Anthropic's Node SDK ----------------------------------------------------------------------


async def test_anthropic_node_sdk_messages_and_stream(
    node_clients: NodeClients, gw: Gateway
) -> None:
    env = {"GATEWAY_URL": gw.url, "API_KEY": ADMIN_KEY}
    seen = await node_clients.run(
        """
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({ baseURL: process.env.GATEWAY_URL, apiKey: process.env.API_KEY,
  maxRetries: 0 });
const messages = [{ role: "user", content: "hello there" }];
const message = await client.messages.create({ model: "sim-a", max_tokens: 6, messages });
const stream = client.messages.stream({ model: "sim-a", max_tokens: 5, messages });
const texts = [];
stream.on("text", (text) => texts.push(text));
const final = await stream.finalMessage();
let refused = null;
try {
  await new Anthropic({ baseURL: process.env.GATEWAY_URL, apiKey: "sk-wrong", maxRetries: 0 })
    .messages.create({ model: "sim-a", max_tokens: 2, messages });
} catch (error) {
  refused = { status: error.status, type: error.error && error.error.error.type };
}
console.log(JSON.stringify({ message, final, texts, refused }));
""",
        env,
        timeout_s=60,
    )
    message, final = seen["message"], seen["final"]
    assert message["type"] == "message"
    assert message["content"][0]["type"] == "text"
    assert 0 < message["usage"]["output_tokens"] <= 6
    assert final["content"][0]["text"] == "".join(seen["texts"])
    assert 0 < final["usage"]["output_tokens"] <= 5
    assert seen["refused"] == {"status": 401, "type": "authentication_error"}
