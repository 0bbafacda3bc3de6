"""The OpenAPI document states the rules the validators enforce.

test_openapi_fuzz.py checks that end to end with Schemathesis; these pin, without a server, the
rules that needed more than a field type to say: the chat request's rules between fields, the
configured cap on its max_tokens, the login form, the shape of cursors and text rules that
every regex engine must read alike.
"""

from __future__ import annotations

import re
import sys
import uuid
from typing import Annotated, Any

import jsonschema_rs
import pytest
from pydantic import BaseModel, StringConstraints, ValidationError

from gateway.app import create_app
from gateway.chat.schemas import ChatRequest
from gateway.chat.service import new_messages
from gateway.conversations.service import CONVERSATION_CURSOR_PATTERN, MESSAGE_CURSOR_PATTERN
from gateway.errors import GatewayError
from gateway.text import NO_NUL_PATTERN, NOT_BLANK_PATTERN, NoNul, NotBlank, is_blank
from tests.helpers.app import make_settings

MAX_TOKENS_CAP = 64
CONVERSATION = str(uuid.uuid4())


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app(make_settings(MAX_TOKENS_CAP=MAX_TOKENS_CAP)).openapi()


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Any:
    # The engine Schemathesis judges requests with, on the document's own components.
    return jsonschema_rs.validator_for({**schema, "components": document["components"]})


def _service_accepts(body: dict[str, Any]) -> bool:
    try:
        new_messages(ChatRequest.model_validate(body))
    except (ValidationError, GatewayError):
        return False
    return True


# Bodies on both sides of each rule between the chat request's fields.
CHAT_BODIES: list[dict[str, Any]] = [
    {"message": "hi"},
    {"action": "send", "message": "hi", "messages": None},
    {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]},
    {},
    {"message": None, "messages": None},
    {"message": "hi", "messages": [{"role": "user", "content": "hi"}]},
    {"message": " \u3000\ufeff\x1c"},
    {"message": "\x85x"},
    {"action": "regenerate", "conversation_id": CONVERSATION},
    {"action": "regenerate", "conversation_id": CONVERSATION, "message": None},
    {"action": "regenerate"},
    {"action": "regenerate", "conversation_id": None},
    {"action": "regenerate", "conversation_id": CONVERSATION, "message": "hi"},
    {"action": "regenerate", "conversation_id": CONVERSATION, "messages": []},
    {"action": "edit", "conversation_id": CONVERSATION, "message": "new"},
    {"action": "edit", "message": "new"},
    {"action": "edit", "conversation_id": CONVERSATION},
    {"action": "edit", "conversation_id": CONVERSATION, "message": "\t"},
    {
        "action": "edit",
        "conversation_id": CONVERSATION,
        "message": "new",
        "messages": [{"role": "user", "content": "x"}],
    },
    {"message": "hi", "max_tokens": 4.0, "seed": -(2**53 - 1)},
    {"message": "hi", "max_tokens": 4.5},
    {"message": "hi", "seed": 2**53},
    {"message": "hi", "max_tokens": MAX_TOKENS_CAP + 1},
    {"message": "hi", "max_tokens": 1e25},
]


@pytest.mark.parametrize("body", CHAT_BODIES, ids=repr)
def test_the_chat_request_document_says_what_the_service_accepts(
    document: dict[str, Any], body: dict[str, Any]
) -> None:
    schema = document["paths"]["/api/chat"]["post"]["requestBody"]["content"]["application/json"]
    stated = _validator(document, schema["schema"]).is_valid(body)
    over_cap = body.get("max_tokens", 0) > MAX_TOKENS_CAP  # refused when relayed, not by the model
    assert stated == (_service_accepts(body) and not over_cap)


def test_the_one_chat_rule_json_schema_cannot_state_has_a_code_of_its_own(
    document: dict[str, Any],
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    schema = document["components"]["schemas"]["ChatRequest"]
    assert _validator(document, schema).is_valid(body)
    with pytest.raises(GatewayError) as refused:
        new_messages(ChatRequest.model_validate(body))
    assert refused.value.code == "invalid_last_message"


def test_the_chat_max_tokens_has_the_configured_cap(document: dict[str, Any]) -> None:
    field = document["components"]["schemas"]["ChatRequest"]["properties"]["max_tokens"]
    integer = next(branch for branch in field["anyOf"] if branch.get("type") == "integer")
    assert (integer["minimum"], integer["maximum"]) == (1, MAX_TOKENS_CAP)


def test_the_login_form_has_the_json_bodys_rules(document: dict[str, Any]) -> None:
    for path in ("/api/auth/login", "/admin/api/login"):
        content = document["paths"][path]["post"]["requestBody"]["content"]
        form = content["application/x-www-form-urlencoded"]["schema"]
        assert form["additionalProperties"] is False
        for name in ("username", "password"):
            assert (
                form["properties"][name]
                == content["application/json"]["schema"]["properties"][name]
            )
        assert form["properties"]["username"]["minLength"] == 1
        assert form["properties"]["username"]["pattern"] == NO_NUL_PATTERN


def test_cursors_have_the_shape_the_api_issues(document: dict[str, Any]) -> None:
    def cursor(path: str) -> dict[str, Any]:
        parameters = document["paths"][path]["get"]["parameters"]
        schema: dict[str, Any] = next(p for p in parameters if p["name"] == "cursor")["schema"]
        return schema

    for path, pattern in (
        ("/api/conversations", CONVERSATION_CURSOR_PATTERN),
        ("/api/conversations/{conversation_id}", MESSAGE_CURSOR_PATTERN),
    ):
        branches = cursor(path)["anyOf"]
        assert {"type": "string", "pattern": pattern} in branches
    assert re.fullmatch(CONVERSATION_CURSOR_PATTERN, f"1796609321000000.{uuid.uuid4().hex}")
    assert re.fullmatch(MESSAGE_CURSOR_PATTERN, "12")


def test_blank_means_the_same_to_python_pydantic_and_json_schema() -> None:
    class Checked(BaseModel):
        text: Annotated[str, NotBlank]

    schema = jsonschema_rs.validator_for({"type": "string", "pattern": NOT_BLANK_PATTERN})
    whitespace = {c for c in range(sys.maxunicode + 1) if chr(c).isspace()} | {0xFEFF}
    for code in [*range(0x3001), 0xFEFF, 0x1F600]:
        if 0xD800 <= code < 0xE000:
            continue  # surrogates are no text
        char = chr(code)
        blank = code in whitespace
        assert is_blank(char) == blank, hex(code)
        assert schema.is_valid(char) == (not blank), hex(code)
        try:
            Checked(text=char)
        except ValidationError:
            assert blank, hex(code)
        else:
            assert not blank, hex(code)


def test_text_rules_are_patterns_in_the_json_schema() -> None:
    class Body(BaseModel):
        plain: Annotated[str, NoNul]
        patterned: Annotated[str, StringConstraints(pattern=r"^a"), NoNul, NotBlank]

    properties = Body.model_json_schema()["properties"]
    assert properties["plain"]["pattern"] == NO_NUL_PATTERN
    assert properties["patterned"]["pattern"] == "^a"
    assert properties["patterned"]["allOf"] == [
        {"pattern": NO_NUL_PATTERN},
        {"pattern": NOT_BLANK_PATTERN},
    ]


def test_every_engine_route_is_documented_with_its_body_and_error_envelope(
    document: dict[str, Any],
) -> None:
    paths = document["paths"]
    for path in (
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/rerank",
        "/v1/score",
        "/tokenize",
        "/detokenize",
    ):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["type"] == "object", path
        assert body["example"], path
    form = paths["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]
    assert form["multipart/form-data"]["schema"]["required"] == ["file"]
    messages = paths["/v1/messages"]["post"]
    assert messages["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "messages",
        "max_tokens",
    ]
    error = messages["responses"]["400"]["content"]["application/json"]["schema"]["anyOf"][0]
    assert error["$ref"].endswith("/AnthropicErrorResponse")
    envelope = document["components"]["schemas"]["AnthropicErrorResponse"]
    assert envelope["required"] == ["type", "error"]
    responses_error = paths["/v1/responses"]["post"]["responses"]["400"]["content"]
    assert responses_error["application/json"]["schema"]["anyOf"][0]["$ref"].endswith(
        "/ErrorResponse"
    )
    stored = paths["/v1/responses/{response_id}"]["get"]
    assert "404" in stored["responses"]
