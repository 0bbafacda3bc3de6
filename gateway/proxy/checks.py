"""Body checks of the engine routes beyond chat, completions and embeddings: the Responses API,
Anthropic's Messages API, rerank, score, tokenize and detokenize.

As in validation.py, only what the gateway acts on (model, stream, token caps) and what would
otherwise reach the engine as nonsense is checked; the rest passes through as the engine
defines it. Anthropic's fields are checked against Anthropic's API, since its clients send them.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError
from gateway.integers import whole_number

ANTHROPIC_ROLES = frozenset({"user", "assistant"})


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


def check_responses(body: dict[str, Any], max_tokens: int) -> None:
    """POST /v1/responses: `input` a non-empty string or list of items."""
    value = body.get("input")
    if isinstance(value, list):
        _objects(value, "input", "input items")
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
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise bad(f"'tools.{index}' must be a tool with a 'name'.", f"tools.{index}")
    choice = body.get("tool_choice")
    if choice is not None and (not isinstance(choice, dict) or "type" not in choice):
        raise bad("'tool_choice' must be an object with a 'type'.", "tool_choice")
    number_field(body, "temperature", 0.0, 1.0)


# -- rerank, score, tokenize, detokenize ---------------------------------------------------------


def check_rerank(body: dict[str, Any]) -> None:
    """POST /v1/rerank: a query and the documents to rank."""
    query = body.get("query")
    if not isinstance(query, str | dict) or not query:
        raise bad("'query' must be a non-empty string.", "query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise bad("'documents' must be a non-empty list.", "documents")
    integer_field(body, "top_n", 0, len(documents))


def check_score(body: dict[str, Any]) -> None:
    """POST /v1/score: the two sides to score (vLLM's text_1/text_2 or queries/documents)."""
    pairs = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"))
    if body.get("data") is None and not any(
        body.get(left) is not None and body.get(right) is not None for left, right in pairs
    ):
        raise bad("Send 'text_1' and 'text_2' (or 'queries' and 'documents') to score.", "text_1")


def check_tokenize(body: dict[str, Any]) -> None:
    """POST /tokenize: a prompt or chat messages."""
    prompt, messages = body.get("prompt"), body.get("messages")
    if isinstance(prompt, str):
        return
    if isinstance(messages, list) and messages:
        return
    raise bad("Send 'prompt' (a string) or 'messages' (a non-empty list) to tokenize.", "prompt")
