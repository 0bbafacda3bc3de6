"""Body checks of the engine routes beyond chat, completions and embeddings: the Responses API,
Anthropic's Messages API, rerank, score, tokenize and detokenize.

As in validation.py, only what the gateway acts on (model, stream, token caps) and what would
otherwise reach the engine as nonsense is checked; the rest passes through as the engine
defines it. Anthropic's fields are checked against Anthropic's API, since its clients send them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.errors import GatewayError
from gateway.integers import whole_number

ANTHROPIC_ROLES = frozenset({"user", "assistant"})
TOOL_CHOICE_TYPES = ("auto", "any", "tool", "none")
# Score's sides, in vLLM's names: each pair is one way to send them.
SCORE_PAIRS = (
    ("text_1", "text_2"),
    ("data_1", "data_2"),
    ("queries", "documents"),
    ("queries", "items"),
)


def bad(message: str, param: str | None, code: str = "invalid_request") -> GatewayError:
    """A 400 naming the field."""
    return GatewayError(400, message, code=code, param=param)


def number_field(body: dict[str, Any], name: str, low: float, high: float) -> None:
    """An optional number within [low, high]."""
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"'{name}' must be a number.", name)
    if not low <= value <= high:
        raise bad(f"'{name}' must be between {low:g} and {high:g}, got {value}.", name)


def integer_field(body: dict[str, Any], name: str, low: int, high: int) -> None:
    """An optional integer within [low, high]; 4.0 is sent on as 4."""
    value = body.get(name)
    if value is None:
        return
    number = whole_number(value)
    if number is None:
        raise bad(f"'{name}' must be an integer.", name)
    # 4.0 is the integer 4 to JSON Schema (and to vLLM); the engine is sent 4.
    body[name] = value = number
    if value < low:
        raise bad(f"'{name}' must be at least {low}, got {value}.", name)
    if value > high:
        raise bad(f"'{name}' must be at most {high} on this gateway, got {value}.", name)


def _text_or_none(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad(f"'{name}' must be a string.", name)


def _objects(value: Any, name: str, what: str) -> None:
    """A non-empty list of objects."""
    if not isinstance(value, list) or not value:
        raise bad(f"'{name}' must be a non-empty list of {what}.", name)
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad(f"'{name}.{index}' must be an object.", f"{name}.{index}")


# -- the Responses API -------------------------------------------------------------------------

# The engines keep no responses (vLLM's store is off: it grows without bound, vllm's own
# warning), so a request that needs a stored one is refused here with the way out.
NOT_STORED = (
    "Responses are not stored on this gateway: send the earlier turns as 'input' items "
    "instead of '{field}'."
)


RESPONSES_ROLES = ("user", "assistant", "system", "developer")
# Input items besides messages: a tool call the model made, and its result.
RESPONSES_ITEM_FIELDS = {
    "function_call": ("call_id", "name", "arguments"),
    "function_call_output": ("call_id", "output"),
}


def _check_input_item(index: int, item: Any) -> None:
    where = f"input.{index}"
    if not isinstance(item, dict):
        raise bad(f"'{where}' must be an object.", where)
    kind = item.get("type", "message")
    fields = RESPONSES_ITEM_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is not None:
        for field in fields:
            if not isinstance(item.get(field), str):
                raise bad(f"'{where}.{field}' must be a string.", f"{where}.{field}")
        return
    if kind != "message":
        kinds = ", ".join(("message", *RESPONSES_ITEM_FIELDS))
        raise bad(f"'{where}.type' must be one of {kinds}.", f"{where}.type")
    role = item.get("role")
    if not isinstance(role, str) or role not in RESPONSES_ROLES:
        allowed = ", ".join(RESPONSES_ROLES)
        raise bad(f"'{where}.role' must be one of {allowed}; got {role!r}.", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return
    if not isinstance(content, str):
        raise bad(f"'{where}.content' must be a string or a list of parts.", f"{where}.content")


def check_responses(body: dict[str, Any], max_tokens: int) -> None:
    """POST /v1/responses: `input` a non-empty string or list of items."""
    value = body.get("input")
    if isinstance(value, list) and value:
        for index, item in enumerate(value):
            _check_input_item(index, item)
    elif not isinstance(value, str) or not value:
        raise bad("'input' must be a non-empty string or a non-empty list of input items.", "input")
    _text_or_none(body, "instructions")
    integer_field(body, "max_output_tokens", 1, max_tokens)
    for field in ("previous_response_id", "conversation"):
        if body.get(field) is not None:
            raise bad(NOT_STORED.format(field=field), field, "responses_not_stored")
    if body.get("background") is True:
        raise bad(
            "Background responses need a response store, which this gateway does not keep.",
            "background",
            "responses_not_stored",
        )


# -- Anthropic's Messages API ------------------------------------------------------------------


def _check_blocks(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise bad(f"'{where}' must be a string or a list of content blocks.", where)
    for index, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise bad(
                f"'{where}.{index}' must be a content block (an object with a 'type').",
                f"{where}.{index}",
            )


def check_anthropic_messages(body: dict[str, Any], max_tokens: int, *, counting: bool) -> None:
    """POST /v1/messages (and /count_tokens, `counting`: no max_tokens there)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list.", "messages")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content'.", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ANTHROPIC_ROLES:
            raise bad(f"'{where}.role' must be user or assistant; got {role!r}.", f"{where}.role")
        if "content" not in message:
            raise bad(f"'{where}.content' is required.", f"{where}.content")
        _check_blocks(message["content"], f"{where}.content")
    system = body.get("system")
    if system is not None:
        _check_blocks(system, "system")
    if not counting:
        if body.get("max_tokens") is None:
            raise bad("'max_tokens' is required.", "max_tokens")
        integer_field(body, "max_tokens", 1, max_tokens)
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops)
    ):
        raise bad("'stop_sequences' must be a list of strings.", "stop_sequences")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("'tools' must be a list of tools.", "tools")
        for index, tool in enumerate(tools):
            where = f"tools.{index}"
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise bad(f"'{where}' must be a tool with a 'name'.", where)
            kind = tool.get("type", "custom")
            if kind not in (None, "custom"):
                raise bad(
                    f"'{where}' is a server tool ({tool['name']}, {kind}): the engines here "
                    "run no server tools; define it as a tool with an input_schema.",
                    where,
                )
            if not isinstance(tool.get("input_schema"), dict):
                raise bad(f"'{where}.input_schema' (a JSON schema object) is required.", where)
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if not isinstance(kind, str) or kind not in TOOL_CHOICE_TYPES:
            raise bad(
                "'tool_choice' must be an object whose 'type' is auto, any, tool or none.",
                "tool_choice",
            )
        name = choice.get("name")
        if kind == "tool" and (not isinstance(name, str) or not name):
            raise bad("'tool_choice' of type tool needs the tool's 'name'.", "tool_choice.name")
        if not tools:
            raise bad("'tool_choice' needs 'tools' to choose from.", "tools")
        if kind == "tool" and name not in {tool["name"] for tool in tools}:
            raise bad(
                "'tool_choice.name' must be the name of one of 'tools'.",
                "tool_choice.name",
                "tool_choice_unknown",
            )
    number_field(body, "temperature", 0.0, 1.0)


# -- rerank, score, tokenize, detokenize ---------------------------------------------------------


def _texts(value: Any) -> bool:
    """A string, or a non-empty list of strings (the text inputs every scoring model takes)."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _count(texts: str | list[str]) -> int:
    return 1 if isinstance(texts, str) else len(texts)


def check_rerank(body: dict[str, Any]) -> None:
    """POST /v1/rerank: a query and the documents to rank (text)."""
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise bad("'query' must be a non-empty string.", "query")
    documents = body.get("documents")
    if (
        not isinstance(documents, list)
        or not documents
        or not all(isinstance(document, str) for document in documents)
    ):
        raise bad("'documents' must be a non-empty list of strings.", "documents")
    integer_field(body, "top_n", 0, len(documents))


def check_score(body: dict[str, Any]) -> None:
    """POST /v1/score: the two sides to score, each a string or a list of strings, as one of
    vLLM's pairs (text_1/text_2, data_1/data_2, queries/documents, queries/items)."""
    for side in sorted({side for pair in SCORE_PAIRS for side in pair}):
        if side in body and not _texts(body[side]):
            raise bad(f"'{side}' must be a string or a non-empty list of strings.", side)
    present = {side for pair in SCORE_PAIRS for side in pair if side in body}
    for left, right in SCORE_PAIRS:
        if present == {left, right}:
            lefts, rights = _count(body[left]), _count(body[right])
            if lefts != 1 and lefts != rights:
                raise bad(
                    f"'{left}' and '{right}' must pair one to one, one to many or many to "
                    f"many of the same count; got {lefts} and {rights}.",
                    right,
                    "score_lengths",
                )
            return
    raise bad(
        "Send one pair to score: 'text_1' and 'text_2', 'data_1' and 'data_2', 'queries' and "
        "'documents', or 'queries' and 'items'.",
        "text_1",
    )


def check_tokenize(body: dict[str, Any], check_messages: Callable[[Any], None]) -> None:
    """POST /tokenize: a prompt or chat messages (checked as chat's: `check_messages`)."""
    if "messages" in body:
        check_messages(body["messages"])
        if "prompt" in body:
            raise bad("Send 'prompt' or 'messages' to tokenize, not both.", "prompt")
        return
    if isinstance(body.get("prompt"), str):
        return
    raise bad("Send 'prompt' (a string) or 'messages' (a non-empty list) to tokenize.", "prompt")
