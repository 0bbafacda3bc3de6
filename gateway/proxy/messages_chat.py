"""Anthropic Messages <-> OpenAI chat completions, for engines that only serve the latter.

Pure translation: no I/O, no gateway imports. The caller checks the basic shape of the request
first; anything here that cannot be translated raises ValueError naming the field, and the
caller answers it with a 400 (or, once a stream has begun, an `error_event`).

Decisions worth knowing:
- Anthropic's fields with no chat equivalent that change the answer (`output_format`,
  `context_management`) are refused; `metadata`, `thinking`, `service_tier`, `container`,
  `mcp_servers` and `cache_control` are dropped, and so are `thinking`/`redacted_thinking` blocks
  and `cache_control` marks (no use to the engine). Other fields are the engine's own sampling
  extras (vLLM's `ignore_eos`, `min_tokens`, `repetition_penalty`...) and are passed on, as the
  gateway passes them on chat completions (its field policy has refused the dangerous ones).
- Text blocks of a user turn are joined with "\\n" (what vLLM does with text parts itself), of
  an assistant turn with "" (they are pieces of one generation); system blocks with "\\n\\n".
- A trailing assistant turn (a prefill) is passed as is: engines differ in whether they continue it.
- Tool call ids pass through both ways unchanged, so a client's `tool_result` finds its call.
- A `stop` finish with tool calls in the answer becomes `tool_use` (some engines say `stop`),
  because Anthropic clients run tools only on `tool_use`.
- `input_tokens` is `prompt_tokens` less the cached ones, which go to `cache_read_input_tokens`:
  Anthropic counts cache reads outside `input_tokens`, OpenAI inside `prompt_tokens`.
- Reasoning deltas (`reasoning_content`) are dropped: a thinking block needs a signature.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import orjson

Event = tuple[str, dict[str, Any]]

DROPPED_FIELDS = frozenset(
    {"metadata", "thinking", "service_tier", "container", "mcp_servers", "cache_control"}
)
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
_KNOWN_FIELDS = frozenset(
    {"model", "messages", "max_tokens", "system", "stop_sequences", "stream", "tools"}
    | {"tool_choice", *_SAMPLING_FIELDS}
)
# Anthropic's own features that a chat completion cannot give: refused, not silently ignored.
UNTRANSLATABLE_FIELDS = frozenset({"output_format", "context_management"})
_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


def chat_body_from_messages(body: dict[str, Any], *, model: str) -> dict[str, Any]:
    """An Anthropic Messages request -> the chat-completions body for the engine serving `model`."""
    refused = sorted(set(body) & UNTRANSLATABLE_FIELDS)
    if refused:
        raise ValueError(f"cannot translate field(s) for this engine: {', '.join(refused)}")
    extras = {
        name: value
        for name, value in body.items()
        if name not in _KNOWN_FIELDS and name not in DROPPED_FIELDS
    }
    messages: list[dict[str, Any]] = []
    system = _system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(body["messages"]):
        messages.extend(_chat_messages(message, f"messages[{i}]"))
    chat: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": body["max_tokens"]}
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    for name in _SAMPLING_FIELDS:
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat.update(_tool_choice(body["tool_choice"]))
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    # The engine's sampling extras, never over a field translated above.
    return {**extras, **chat}


def _block_type(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise ValueError(f"{where}: a content block must be an object with a type")
    return kind


def _text_of(block: Any, where: str) -> str:
    kind = _block_type(block, where)
    if kind != "text" or not isinstance(block.get("text"), str):
        raise ValueError(f"{where}: a {kind!r} block cannot be translated here (text only)")
    return str(block["text"])


def _system_text(system: Any) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if isinstance(system, list):
        return "\n\n".join(_text_of(block, f"system[{i}]") for i, block in enumerate(system))
    raise ValueError("system: must be a string or a list of text blocks")


def _chat_messages(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    role, content = message.get("role"), message.get("content")
    if role not in ("user", "assistant"):
        raise ValueError(f"{where}.role: must be user or assistant, not {role!r}")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise ValueError(f"{where}.content: must be a string or a list of blocks")
    if role == "user":
        return _user_messages(content, where)
    return [_assistant_message(content, where)]


def _user_messages(content: list[Any], where: str) -> list[dict[str, Any]]:
    """Tool results first (one `tool` message each, in order), then the turn's text and images."""
    messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = _block_type(block, at)
        if kind == "text":
            parts.append({"type": "text", "text": _text_of(block, at)})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, at)}})
        elif kind == "tool_result":
            messages.append(_tool_message(block, at))
        elif kind not in _DROPPED_BLOCKS:
            raise ValueError(f"{at}: a {kind!r} block cannot be translated for this engine")
    if parts and all(part["type"] == "text" for part in parts):
        messages.append({"role": "user", "content": "\n".join(part["text"] for part in parts)})
    elif parts or not messages:
        messages.append({"role": "user", "content": parts or ""})
    return messages


def _image_url(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source, dict):
        media_type, data = source.get("media_type"), source.get("data")
        if isinstance(media_type, str) and isinstance(data, str):
            return f"data:{media_type};base64,{data}"
    elif kind == "url" and isinstance(source, dict) and isinstance(source.get("url"), str):
        return str(source["url"])
    raise ValueError(f"{where}.source: only base64 and url image sources can be translated")


def _tool_message(block: dict[str, Any], where: str) -> dict[str, Any]:
    """A `tool_result` -> a `tool` message; an error result says so in its first word."""
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str):
        raise ValueError(f"{where}.tool_use_id: must be a string")
    content = block.get("content", "")
    if isinstance(content, list):
        content = "\n".join(_text_of(b, f"{where}.content[{j}]") for j, b in enumerate(content))
    elif not isinstance(content, str):
        raise ValueError(f"{where}.content: must be a string or a list of text blocks")
    if block.get("is_error"):
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": tool_use_id, "content": content}


def _assistant_message(content: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = _block_type(block, at)
        if kind == "text":
            texts.append(_text_of(block, at))
        elif kind == "tool_use":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
            if not (isinstance(call_id, str) and isinstance(name, str)):
                raise ValueError(f"{at}: a tool_use block needs a string id and name")
            if not isinstance(arguments, dict):
                raise ValueError(f"{at}.input: must be an object")
            function = {"name": name, "arguments": orjson.dumps(arguments).decode()}
            calls.append({"id": call_id, "type": "function", "function": function})
        elif kind not in _DROPPED_BLOCKS:
            raise ValueError(f"{at}: a {kind!r} block cannot be translated for this engine")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
        message["content"] = message["content"] or None
    return message


def _tools(tools: Any) -> list[dict[str, Any]]:
    """Custom tools -> functions; server tools (web search, code execution...) are refused."""
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise ValueError("tools: must be a list of objects")
    server = [
        f"{tool.get('name')} ({tool['type']})"
        for tool in tools
        if tool.get("type") not in (None, "custom")
    ]
    if server:
        raise ValueError(f"tools: server tools cannot run on this engine: {', '.join(server)}")
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool.get("name"), str):
            raise ValueError(f"tools[{i}].name: must be a string")
        function = {
            "name": tool["name"],
            "parameters": tool.get("input_schema") or dict(_EMPTY_SCHEMA),
        }
        for name in ("description", "strict"):
            if tool.get(name) is not None:
                function[name] = tool[name]
        functions.append({"type": "function", "function": function})
    return functions


def _tool_choice(choice: Any) -> dict[str, Any]:
    kind = choice.get("type") if isinstance(choice, dict) else None
    value: Any
    if kind == "tool" and isinstance(choice, dict) and isinstance(choice.get("name"), str):
        value = {"type": "function", "function": {"name": choice["name"]}}
    elif isinstance(kind, str) and kind in _TOOL_CHOICES:
        value = _TOOL_CHOICES[kind]
    else:
        raise ValueError(f"tool_choice: {choice!r} cannot be translated")
    translated = {"tool_choice": value}
    if choice.get("disable_parallel_tool_use"):
        translated["parallel_tool_calls"] = False
    return translated


def message_from_chat(
    chat: dict[str, Any], *, model: str, stop_sequences: Sequence[str] = ()
) -> dict[str, Any]:
    """An OpenAI chat completion -> an Anthropic `message` named `model` (the client's name).

    Tool arguments that are not a JSON object (a model's malformed output) are kept as
    `{"_raw": "<arguments>"}` rather than dropped to `{}`: the client's tool then fails on
    visible input and can say so to the model, where `{}` would run the tool with nothing.
    """
    choices = chat.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the engine's completion has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        tool_id = call.get("id") or _random_id("toolu_")
        name, arguments = function.get("name") or "", _tool_input(function.get("arguments"))
        content.append({"type": "tool_use", "id": tool_id, "name": name, "input": arguments})
    stop_reason, stop_sequence = _stop(
        choice.get("finish_reason"),
        choice.get("stop_reason"),
        stop_sequences,
        tool_use=any(block["type"] == "tool_use" for block in content),
    )
    return _message(
        id=_message_id(chat.get("id")),
        model=model,
        content=content,
        stop_reason=stop_reason,
        stop_sequence=stop_sequence,
        usage=message_usage(chat.get("usage") or {}),
    )


def _message(**fields: Any) -> dict[str, Any]:
    empty: dict[str, Any] = {"content": [], "stop_reason": None, "stop_sequence": None}
    return {"type": "message", "role": "assistant", **empty, **fields}


def _tool_input(arguments: Any) -> dict[str, Any]:
    if arguments is None or arguments == "":
        return {}
    try:
        parsed = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        parsed = None
    return parsed if isinstance(parsed, dict) else {"_raw": arguments}


def _stop(
    finish_reason: Any, matched: Any, stop_sequences: Sequence[str], *, tool_use: bool
) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for an OpenAI finish_reason.

    `matched` is vLLM's `stop_reason` (the stop string that ended the text); engines that do not
    report it give `end_turn` for a stop sequence. Unknown reasons, or none, read as `end_turn`.
    """
    if finish_reason == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    reason = _STOP_REASONS.get(finish_reason or "stop", "end_turn")
    return ("tool_use" if tool_use and reason == "end_turn" else reason), None


def message_usage(usage: dict[str, Any]) -> dict[str, int]:
    """OpenAI usage -> Anthropic usage (cached prompt tokens counted apart, as Anthropic does)."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    translated = {
        "input_tokens": max(_count(usage.get("prompt_tokens")) - _count(cached), 0),
        "output_tokens": _count(usage.get("completion_tokens")),
    }
    if cached is not None:
        translated["cache_read_input_tokens"] = _count(cached)
    return translated


def error_event(error_type: str, message: str) -> Event:
    """Anthropic's stream `error` event, e.g. `("overloaded_error", "...")`."""
    return "error", {"type": "error", "error": {"type": error_type, "message": message}}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _random_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _message_id(chat_id: Any) -> str:
    if isinstance(chat_id, str) and chat_id:
        return "msg_" + chat_id.removeprefix("chatcmpl-")
    return _random_id("msg_")


class ChatStreamToMessages:
    """Translates one streamed chat completion, chunk by chunk, into Anthropic stream events.

    One block is open at a time, as Anthropic streams them. Tool calls arrive one after
    another from engines; a fragment for a call whose block was already closed raises
    ValueError rather than being reordered. Argument fragments pass as the engine sent them (a
    client parses the whole at the end). Without upstream usage, the final `output_tokens`
    is `deltas` (one token per delta, an estimate) and `usage` stays None. Error payloads
    inside the upstream stream are the caller's to spot and relay with `error_event`.
    """

    def __init__(self, *, model: str, stop_sequences: Sequence[str] = ()) -> None:
        self._model = model
        self._stop_sequences = tuple(stop_sequences)
        self._message_id = _random_id("msg_")
        self._started = False
        self._open_key: str | int | None = None  # "text", or the open tool call's index
        self._next_index = 0
        self._tool_calls: set[int] = set()  # tool call indexes whose block has opened
        # Tool calls whose name has not come yet (their block cannot open): id, arguments so far.
        self._pending: dict[int, tuple[str | None, str]] = {}
        self._usage: dict[str, Any] | None = None
        self._finish_reason: Any = None
        self._matched: Any = None
        self.deltas = 0

    @property
    def message_id(self) -> str:
        """The message's id: the engine's completion id once the first chunk is in."""
        return self._message_id

    @property
    def usage(self) -> dict[str, int] | None:
        """The engine's usage in the gateway's accounting shape, once the engine sent it."""
        if self._usage is None:
            return None
        prompt = _count(self._usage.get("prompt_tokens"))
        completion = _count(self._usage.get("completion_tokens"))
        total = _count(self._usage.get("total_tokens")) or prompt + completion
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """The events one `chat.completion.chunk` completes, in order."""
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        events: list[Event] = []
        if not self._started:
            self._message_id = _message_id(chunk.get("id")) if chunk.get("id") else self._message_id
            events.append(self._message_start())
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self._open_key != "text":
                    events += self._open_block("text", {"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": text}))
            for call in delta.get("tool_calls") or []:
                events += self._tool_fragment(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
                self._matched = choice.get("stop_reason")
        return events

    def finish(self) -> list[Event]:
        """The closing events, after the upstream's `[DONE]`."""
        if self._pending:
            raise ValueError(f"tool call(s) {sorted(self._pending)} never named their function")
        events = [] if self._started else [self._message_start()]
        events += self._close_block()
        tool_use = bool(self._tool_calls)
        stop = _stop(self._finish_reason, self._matched, self._stop_sequences, tool_use=tool_use)
        usage = (
            {"output_tokens": self.deltas} if self._usage is None else message_usage(self._usage)
        )
        delta = {"stop_reason": stop[0], "stop_sequence": stop[1]}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _message_start(self) -> Event:
        self._started = True
        usage = message_usage(self._usage or {})
        usage["output_tokens"] = 0
        message = _message(id=self._message_id, model=self._model, usage=usage)
        return "message_start", {"type": "message_start", "message": message}

    def _close_block(self) -> list[Event]:
        if self._open_key is None:
            return []
        self._open_key = None
        stop = {"type": "content_block_stop", "index": self._next_index - 1}
        return [("content_block_stop", stop)]

    def _open_block(self, key: str | int, block: dict[str, Any]) -> list[Event]:
        events = self._close_block()
        self._open_key = key
        start = {"type": "content_block_start", "index": self._next_index, "content_block": block}
        self._next_index += 1
        return [*events, ("content_block_start", start)]

    def _delta(self, delta: dict[str, Any]) -> Event:
        self.deltas += 1
        data = {"type": "content_block_delta", "index": self._next_index - 1, "delta": delta}
        return "content_block_delta", data

    def _tool_fragment(self, call: dict[str, Any]) -> list[Event]:
        index = call.get("index", 0)
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        if index in self._tool_calls:
            if self._open_key != index:
                raise ValueError(f"tool call {index} resumed after another block began")
            if not arguments:
                return []
            return [self._delta({"type": "input_json_delta", "partial_json": arguments})]
        call_id, buffered = self._pending.pop(index, (None, ""))
        call_id, buffered = call_id or call.get("id"), buffered + arguments
        if not function.get("name"):
            self._pending[index] = (call_id, buffered)
            return []
        self._tool_calls.add(index)
        tool_id = call_id or _random_id("toolu_")
        block = {"type": "tool_use", "id": tool_id, "name": function["name"], "input": {}}
        events = self._open_block(index, block)
        if buffered:
            events.append(self._delta({"type": "input_json_delta", "partial_json": buffered}))
        return events
