"""The body checks of the routes beyond chat (gateway/proxy/checks.py through parse_request):
each refusal names its field, and what engines take passes untouched."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.proxy.validation import Limits, Route, parse_request

LIMITS = Limits(max_n=4, max_tokens=64, max_body_bytes=1 << 20, max_json_depth=32)
HI = [{"role": "user", "content": "hi"}]
TOOL = {"name": "f", "input_schema": {"type": "object"}}


def _parse(route: Route, body: dict[str, Any]) -> Any:
    return parse_request(route, orjson.dumps(body), LIMITS)


def _refused(route: Route, body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        _parse(route, body)
    assert caught.value.status_code == 400
    return caught.value


@pytest.mark.parametrize(
    "body",
    [
        {"input": "hi"},
        {"input": [{"role": "user", "content": "hi"}], "instructions": "be brief"},
        {"input": [{"type": "message", "role": "developer", "content": [{"type": "input_text"}]}]},
        {
            "input": [
                {"role": "user", "content": "weather?"},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ]
        },
    ],
)
def test_responses_bodies_engines_take_pass(body: dict[str, Any]) -> None:
    checked = _parse(Route.RESPONSES, {"model": "m", **body})
    assert checked.body["input"] == body["input"]
    assert checked.route is Route.RESPONSES


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
        ({"input": [{"type": "reasoning"}]}, "input.0.type"),
        ({"input": [{"type": "function_call", "call_id": "c"}]}, "input.0.name"),
        ({"input": [{"role": "user", "content": 3}]}, "input.0.content"),
        ({"input": "x", "max_output_tokens": 65}, "max_output_tokens"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ],
)
def test_responses_refusals_name_the_field(body: dict[str, Any], param: str) -> None:
    assert _refused(Route.RESPONSES, body).param == param


def test_responses_streams_and_keeps_stream_options_without_chats_rule() -> None:
    checked = _parse(Route.RESPONSES, {"input": "x", "stream": True})
    assert checked.stream is True
    assert _parse(Route.RESPONSES, {"input": "x", "stream_options": {}}).stream is False


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HI}, "max_tokens"),
        ({"messages": HI, "max_tokens": 65}, "max_tokens"),
        ({"messages": HI, "max_tokens": 8, "tool_choice": {"type": "any"}}, "tools"),
        (
            {"messages": HI, "max_tokens": 8, "tools": [TOOL], "tool_choice": {"type": "tool"}},
            "tool_choice.name",
        ),
        (
            {"messages": HI, "max_tokens": 8, "tools": [TOOL], "tool_choice": {"type": "all"}},
            "tool_choice",
        ),
        ({"messages": HI, "max_tokens": 8, "tools": [{"name": "f"}]}, "tools.0"),
        (
            {
                "messages": HI,
                "max_tokens": 8,
                "tools": [TOOL],
                "tool_choice": {"type": "tool", "name": "g"},
            },
            "tool_choice.name",
        ),
        (
            {"messages": HI, "max_tokens": 8, "tools": [{"type": "bash_20250124", "name": "b"}]},
            "tools.0",
        ),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}], "max_tokens": 8}, None),
    ],
)
def test_messages_refusals(body: dict[str, Any], param: str | None) -> None:
    refused = _refused(Route.MESSAGES, body)
    if param is not None:
        assert refused.param == param


def test_count_tokens_needs_no_max_tokens_and_never_streams() -> None:
    checked = _parse(Route.COUNT_TOKENS, {"messages": HI, "stream": True})
    assert checked.stream is False
    assert _parse(Route.MESSAGES, {"messages": HI, "max_tokens": 8, "stream": True}).stream


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"text_1": "a", "text_2": ["b", "c"]}, True),
        ({"text_1": ["a", "b"], "text_2": ["c", "d"]}, True),
        ({"queries": ["a"], "documents": ["b", "c", "d"]}, True),
        ({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, False),
        ({"text_1": "a", "text_2": []}, False),
        ({"text_1": "a", "text_2": [1]}, False),
        ({"text_1": "a"}, False),
        ({"text_1": "a", "text_2": "b", "queries": None}, False),
        ({"text_1": "a", "text_2": "b", "queries": ["c"], "documents": ["d"]}, False),
    ],
)
def test_score_pairs(body: dict[str, Any], ok: bool) -> None:
    if ok:
        assert _parse(Route.SCORE, body).route is Route.SCORE
    else:
        _refused(Route.SCORE, body)


def test_score_lengths_have_their_own_code() -> None:
    refused = _refused(Route.SCORE, {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert refused.code == "score_lengths"


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"prompt": "hi"}, True),
        ({"messages": HI}, True),
        ({"prompt": "hi", "messages": HI}, False),
        ({"messages": None}, False),
        ({"messages": [{"role": "nobody", "content": "x"}]}, False),
        ({}, False),
    ],
)
def test_tokenize_takes_a_prompt_or_messages(body: dict[str, Any], ok: bool) -> None:
    if ok:
        assert _parse(Route.TOKENIZE, body).stream is False
    else:
        _refused(Route.TOKENIZE, body)


def test_detokenize_ids_are_sent_as_integers() -> None:
    assert _parse(Route.DETOKENIZE, {"tokens": [1.0, 2]}).body["tokens"] == [1, 2]
    assert _refused(Route.DETOKENIZE, {"tokens": [2**31]}).param == "tokens"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "", "documents": ["d"]}, "query"),
        ({"query": {"text": "q"}, "documents": ["d"]}, "query"),
        ({"query": "q", "documents": [None]}, "documents"),
        ({"query": "q", "documents": ["d"], "top_n": 2}, "top_n"),
    ],
)
def test_rerank_refusals(body: dict[str, Any], param: str) -> None:
    assert _refused(Route.RERANK, body).param == param
