"""Anthropic Messages <-> OpenAI chat translation, read back by the official SDKs.

Requests are the bodies the anthropic SDK really sends (captured at its transport); completions
and chunks are vLLM's shapes, checked against the openai SDK's models; every translated message
and stream is read by the anthropic SDK (its stream accumulator, served over a MockTransport).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import Message
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.proxy.messages_chat import (
    ChatStreamToMessages,
    chat_body_from_messages,
    error_event,
    message_from_chat,
    message_usage,
)

Event = tuple[str, dict[str, Any]]
CLIENT_MODEL = "claude-sonnet-4-5"
ENGINE_MODEL = "Qwen/Qwen2.5-7B-Instruct"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def _client(handler: Any) -> anthropic.Anthropic:
    http_client = httpx.Client(transport=httpx.MockTransport(handler))
    return anthropic.Anthropic(api_key="x", base_url="http://test", http_client=http_client)


def _sent_body(**create: Any) -> dict[str, Any]:
    """The JSON body the anthropic SDK sends for `messages.create(**create)`."""
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(orjson.loads(request.content))
        return httpx.Response(400, json={"type": "error", "error": {"type": "x", "message": "x"}})

    client = _client(handler).with_options(max_retries=0)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(**create)
    return sent[0]


def _translate(**create: Any) -> dict[str, Any]:
    create.setdefault("model", CLIENT_MODEL)
    create.setdefault("max_tokens", 256)
    return chat_body_from_messages(_sent_body(**create), model=ENGINE_MODEL)


def _sse(events: list[Event]) -> bytes:
    return b"".join(
        b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        for name, data in events
    )


def _replay(events: list[Event]) -> tuple[Message, list[str]]:
    """The final message and event types the anthropic SDK reads from these events."""
    assert all(data["type"] == name for name, data in events)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/messages"
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=headers, content=_sse(events))

    stream = _client(handler).messages.stream(
        model=CLIENT_MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    with stream as reader:
        seen: list[str] = [event.type for event in reader]
        message = reader.get_final_message()
    return Message.model_validate(message.model_dump()), seen


def _chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish_reason: str | None = None,
    stop_reason: str | int | None = None,
    usage: dict[str, Any] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    """One vLLM `chat.completion.chunk` (with vLLM's extra `stop_reason` on the choice)."""
    chunk: dict[str, Any] = {
        "id": "chatcmpl-9f2c1a",
        "object": "chat.completion.chunk",
        "created": 1765000000,
        "model": ENGINE_MODEL,
        "choices": [],
    }
    if choices:
        choice = {"index": 0, "delta": delta or {}, "logprobs": None}
        chunk["choices"] = [{**choice, "finish_reason": finish_reason, "stop_reason": stop_reason}]
    if usage is not None:
        chunk["usage"] = usage
    ChatCompletionChunk.model_validate(chunk)
    return chunk


def _usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _run(chunks: list[dict[str, Any]], stop: tuple[str, ...] = ()) -> list[Event]:
    translator = ChatStreamToMessages(model=CLIENT_MODEL, stop_sequences=stop)
    events = [event for chunk in chunks for event in translator.feed(chunk)]
    return events + translator.finish()


def _names(events: list[Event]) -> list[str]:
    return [name for name, _ in events]


def _tool_call(index: int, **fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, **fields}]}


# Requests


def test_system_blocks_text_and_sampling_fields() -> None:
    chat = _translate(
        system=[
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Answer in French.", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Weather?"}, {"type": "text", "text": "Now."}],
            },
        ],
        stop_sequences=["END"],
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": "u-1"},
        stream=True,
    )
    assert chat == {
        "model": ENGINE_MODEL,
        "messages": [
            {"role": "system", "content": "You are terse.\n\nAnswer in French."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Weather?\nNow."},
        ],
        "max_tokens": 256,
        "stop": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_images_become_image_url_parts() -> None:
    chat = _translate(
        system="Describe images.",
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.jpg"}},
                    {"type": "text", "text": "What are these?"},
                ],
            }
        ],
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Describe images."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/cat.jpg"}},
                {"type": "text", "text": "What are these?"},
            ],
        },
    ]
    assert "stream" not in chat


def test_tool_history_and_tools() -> None:
    chat = _translate(
        tools=[WEATHER_TOOL, {"name": "now", "input_schema": {"type": "object"}}],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Two calls.", "signature": "sig"},
                    {"type": "text", "text": "Checking "},
                    {"type": "text", "text": "both."},
                    {
                        "type": "tool_use",
                        "id": "toolu_01",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_02",
                        "name": "get_weather",
                        "input": {"city": "Rome"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Be quick."},
                    {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_02",
                        "is_error": True,
                        "content": [{"type": "text", "text": "city service down"}],
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_03", "name": "now", "input": {}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_03"}]},
        ],
    )
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER_TOOL["input_schema"],
                "description": "Current weather in a city",
            },
        },
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}},
    ]
    assert chat["tool_choice"] == "auto"
    assert chat["parallel_tool_calls"] is False
    assert "thinking" not in chat
    calls = [
        {
            "id": f"toolu_0{n}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": f'{{"city":"{city}"}}'},
        }
        for n, city in ((1, "Paris"), (2, "Rome"))
    ]
    now_call = {
        "id": "toolu_03",
        "type": "function",
        "function": {"name": "now", "arguments": "{}"},
    }
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "18C sunny"},
        {"role": "tool", "tool_call_id": "toolu_02", "content": "Error: city service down"},
        {"role": "user", "content": "Be quick."},
        {"role": "assistant", "content": None, "tool_calls": [now_call]},
        {"role": "tool", "tool_call_id": "toolu_03", "content": ""},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "get_weather"},
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        ),
        (
            {"type": "any", "disable_parallel_tool_use": True},
            {"tool_choice": "required", "parallel_tool_calls": False},
        ),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    chat = _translate(
        tools=[WEATHER_TOOL], tool_choice=choice, messages=[{"role": "user", "content": "Hi"}]
    )
    assert {key: chat[key] for key in ("tool_choice", "parallel_tool_calls") if key in chat} == (
        expected
    )


def test_server_tools_are_refused_by_name() -> None:
    body = _sent_body(
        model=CLIENT_MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "Search the news"}],
        tools=[WEATHER_TOOL, {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
    )
    with pytest.raises(ValueError, match=r"tools: .*web_search \(web_search_20250305\)"):
        chat_body_from_messages(body, model=ENGINE_MODEL)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            r"messages\[0\]\.content\[0\]: a 'document' block",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "image", "source": {}}]},
                ]
            },
            r"messages\[1\]\.content\[0\]: a 'image' block",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [{"type": "image", "source": {}}],
                            }
                        ],
                    }
                ]
            },
            r"messages\[0\]\.content\[0\]\.content\[0\]: a 'image' block .*text only",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            },
            r"messages\[0\]\.content\[0\]\.source",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "output_format": {}},
            "output_format",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "maybe"}},
            "tool_choice",
        ),
    ],
)
def test_untranslatable_requests_name_the_field(body: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        chat_body_from_messages({"max_tokens": 16, **body}, model=ENGINE_MODEL)


# Whole responses


def _completion(message: dict[str, Any], finish_reason: str, **choice: Any) -> dict[str, Any]:
    chat = {
        "id": "chatcmpl-5b7e",
        "object": "chat.completion",
        "created": 1765000000,
        "model": ENGINE_MODEL,
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason, **choice},
        ],
        "usage": _usage(40, 9, cached=32),
    }
    ChatCompletion.model_validate(chat)
    return chat


def _read_by_sdk(message: dict[str, Any]) -> Message:
    Message.model_validate(message)
    client = _client(lambda request: httpx.Response(200, json=message))
    return client.messages.create(
        model=CLIENT_MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )


def test_text_completion() -> None:
    chat = _completion({"role": "assistant", "content": "Bonjour !"}, "stop", stop_reason=None)
    message = _read_by_sdk(message_from_chat(chat, model=CLIENT_MODEL))
    assert message.id == "msg_5b7e"
    assert message.model == CLIENT_MODEL
    assert [(block.type, getattr(block, "text", None)) for block in message.content] == [
        ("text", "Bonjour !")
    ]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (8, 9)
    assert message.usage.cache_read_input_tokens == 32


def test_tool_calls_completion_and_malformed_arguments() -> None:
    calls = [
        {
            "id": "chatcmpl-tool-a1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "chatcmpl-tool-a2",
            "type": "function",
            "function": {"name": "now", "arguments": ""},
        },
        {
            "id": "chatcmpl-tool-a3",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Ro'},
        },
    ]
    # Some engines say "stop" even when the answer is tool calls.
    chat = _completion({"role": "assistant", "content": None, "tool_calls": calls}, "stop")
    message = _read_by_sdk(message_from_chat(chat, model=CLIENT_MODEL))
    assert message.stop_reason == "tool_use"
    assert [(block.type, getattr(block, "id", None)) for block in message.content] == [
        ("tool_use", "chatcmpl-tool-a1"),
        ("tool_use", "chatcmpl-tool-a2"),
        ("tool_use", "chatcmpl-tool-a3"),
    ]
    assert [getattr(block, "input", None) for block in message.content] == [
        {"city": "Paris"},
        {},
        {"_raw": '{"city": "Ro'},
    ]


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason", "expected"),
    [
        ("stop", "END", ("stop_sequence", "END")),
        ("stop", 151645, ("end_turn", None)),  # vLLM reports a stop token id as an int
        ("stop", "OTHER", ("end_turn", None)),
        ("length", None, ("max_tokens", None)),
        ("tool_calls", None, ("tool_use", None)),
        ("content_filter", None, ("refusal", None)),
    ],
)
def test_stop_reasons(
    finish_reason: str, stop_reason: str | int | None, expected: tuple[str, str | None]
) -> None:
    chat = _completion(
        {"role": "assistant", "content": "x"}, finish_reason, stop_reason=stop_reason
    )
    message = _read_by_sdk(message_from_chat(chat, model=CLIENT_MODEL, stop_sequences=["END"]))
    assert (message.stop_reason, message.stop_sequence) == expected


def test_usage_without_cache_details() -> None:
    assert message_usage(_usage(12, 3)) == {"input_tokens": 12, "output_tokens": 3}
    assert message_usage({}) == {"input_tokens": 0, "output_tokens": 0}


def test_completion_without_choices_is_refused() -> None:
    with pytest.raises(ValueError, match="no choices"):
        message_from_chat({"id": "x", "choices": []}, model=CLIENT_MODEL)


# Streams


def _text_chunks() -> Iterator[dict[str, Any]]:
    yield _chunk({"role": "assistant", "content": ""})
    yield _chunk({"content": "Hel"})
    yield _chunk({"content": "lo"})
    yield _chunk({}, finish_reason="stop")
    yield _chunk(usage=_usage(12, 3), choices=False)


def test_text_stream() -> None:
    translator = ChatStreamToMessages(model=CLIENT_MODEL)
    events = [event for chunk in _text_chunks() for event in translator.feed(chunk)]
    events += translator.finish()
    assert _names(events) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0][1]["message"]["id"] == translator.message_id == "msg_9f2c1a"
    assert events[0][1]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert events[5][1]["usage"] == {"input_tokens": 12, "output_tokens": 3}
    assert translator.usage == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert translator.deltas == 2
    message, seen = _replay(events)
    assert seen[:2] == ["message_start", "content_block_start"]
    assert [getattr(block, "text", None) for block in message.content] == ["Hello"]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 3)


def test_two_parallel_tool_calls_stream() -> None:
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Checking both."}),
        _chunk(
            _tool_call(
                0,
                id="chatcmpl-tool-p1",
                type="function",
                function={"name": "get_weather", "arguments": ""},
            )
        ),
        _chunk(_tool_call(0, function={"arguments": '{"city": '})),
        _chunk(_tool_call(0, function={"arguments": '"Paris"}'})),
        _chunk(
            _tool_call(
                1,
                id="chatcmpl-tool-p2",
                type="function",
                function={"name": "get_weather", "arguments": '{"ci'},
            )
        ),
        _chunk(_tool_call(1, function={"arguments": 'ty": "Rome"}'})),
        _chunk({}, finish_reason="tool_calls"),
        _chunk(usage=_usage(80, 31, cached=64), choices=False),
    ]
    events = _run(chunks)
    assert _names(events) == [
        "message_start",
        *["content_block_start", "content_block_delta", "content_block_stop"],
        *["content_block_start", "content_block_delta", "content_block_delta"],
        *["content_block_stop", "content_block_start", "content_block_delta"],
        *["content_block_delta", "content_block_stop", "message_delta", "message_stop"],
    ]
    starts = [data for name, data in events if name == "content_block_start"]
    assert [start["index"] for start in starts] == [0, 1, 2]
    assert starts[2]["content_block"] == {
        "type": "tool_use",
        "id": "chatcmpl-tool-p2",
        "name": "get_weather",
        "input": {},
    }
    assert events[-2][1]["usage"] == {
        "input_tokens": 16,
        "output_tokens": 31,
        "cache_read_input_tokens": 64,
    }
    message, _ = _replay(events)
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert [getattr(block, "input", None) for block in message.content[1:]] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    assert [getattr(block, "id", None) for block in message.content[1:]] == [
        "chatcmpl-tool-p1",
        "chatcmpl-tool-p2",
    ]
    assert message.stop_reason == "tool_use"
    assert message.usage.cache_read_input_tokens == 64


def test_length_stream_without_usage_estimates_output_tokens() -> None:
    translator = ChatStreamToMessages(model=CLIENT_MODEL)
    for chunk in (_chunk({"content": "one "}), _chunk({"content": "two"}, finish_reason="length")):
        translator.feed(chunk)
    events = translator.finish()
    assert translator.usage is None
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"output_tokens": 2},
    }


def test_stop_sequence_stream() -> None:
    chunks = [
        _chunk({"role": "assistant", "content": "Done"}),
        _chunk({}, finish_reason="stop", stop_reason="###"),
        _chunk(usage=_usage(5, 2), choices=False),
    ]
    message, _ = _replay(_run(chunks, stop=("END", "###")))
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "###")
    assert [getattr(block, "text", None) for block in message.content] == ["Done"]


def test_usage_on_the_first_chunk_goes_into_message_start() -> None:
    # vLLM's continuous_usage_stats puts usage on every chunk.
    chunks = [
        _chunk({"role": "assistant", "content": ""}, usage=_usage(21, 0)),
        _chunk({"content": "Hi"}, usage=_usage(21, 1)),
        _chunk({}, finish_reason="stop", usage=_usage(21, 1)),
    ]
    events = _run(chunks)
    assert events[0][1]["message"]["usage"] == {"input_tokens": 21, "output_tokens": 0}
    message, _ = _replay(events)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (21, 1)


def test_tool_call_named_after_its_first_fragment() -> None:
    chunks = [
        _chunk(_tool_call(0, id="call_7", function={"arguments": '{"city"'})),
        _chunk(_tool_call(0, function={"name": "get_weather", "arguments": ': "Oslo"}'})),
        _chunk({}, finish_reason="tool_calls"),
    ]
    events = _run(chunks)
    assert events[1][1]["content_block"]["id"] == "call_7"
    assert events[2][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"city": "Oslo"}'}
    message, _ = _replay(events)
    assert getattr(message.content[0], "input", None) == {"city": "Oslo"}


def test_text_after_a_tool_call_opens_a_new_block_and_a_resumed_call_is_refused() -> None:
    translator = ChatStreamToMessages(model=CLIENT_MODEL)
    translator.feed(_chunk(_tool_call(0, id="c1", function={"name": "now", "arguments": "{"})))
    events = translator.feed(_chunk({"content": "\n"}))
    assert _names(events) == ["content_block_stop", "content_block_start", "content_block_delta"]
    assert events[1][1]["index"] == 1
    with pytest.raises(ValueError, match="tool call 0 resumed"):
        translator.feed(_chunk(_tool_call(0, function={"arguments": "}"})))


def test_empty_stream_still_reads_as_a_message() -> None:
    translator = ChatStreamToMessages(model=CLIENT_MODEL)
    events = translator.finish()
    assert _names(events) == ["message_start", "message_delta", "message_stop"]
    message, _ = _replay(events)
    assert message.content == []
    assert message.id == translator.message_id
    assert message.id.startswith("msg_")


def test_error_event_is_raised_by_the_sdk() -> None:
    start = ChatStreamToMessages(model=CLIENT_MODEL).feed(_chunk({"content": "Hi"}))
    name, data = error_event("overloaded_error", "the engine went away")
    assert data == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "the engine went away"},
    }
    with pytest.raises(anthropic.APIStatusError, match="the engine went away"):
        _replay([*start, (name, data)])


def test_engine_sampling_extras_pass_through_and_never_override_a_translated_field() -> None:
    chat = chat_body_from_messages(
        {
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
            "ignore_eos": True,
            "repetition_penalty": 1.1,
            "stop": ["never"],  # a chat field sent by a client: the translation's stop wins
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u"},
        },
        model=ENGINE_MODEL,
    )
    assert chat["ignore_eos"] is True
    assert chat["repetition_penalty"] == 1.1
    assert chat["stop"] == ["END"]
    assert "metadata" not in chat
    assert "stop_sequences" not in chat
