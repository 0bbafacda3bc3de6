"""vLLM's Anthropic Messages API (``/v1/messages``, ``/v1/messages/count_tokens``).

As in vLLM, a request is turned into a chat conversation (system first, ``tool_use`` blocks
as tool calls, a user's ``tool_result`` as a tool message) and costs what that conversation
costs on ``/v1/chat/completions``; the message id is the chat completion's
(``chatcmpl-...``) and tool-use ids are vLLM's tool-call ids (``chatcmpl-tool-...``). The
stream is vLLM's: ``event: <type>`` lines, ``message_start`` ... ``message_stop``, no ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import orjson

from simulator import text, tools
from simulator.config import SimulatorConfig
from simulator.errors import SimulatorRequestError, anthropic_error_body, error_type_for
from simulator.prompt import RenderedPrompt, render_chat
from simulator.protocol import (
    ChoicePlan,
    GenerationPlan,
    check_context,
    optional_bool,
    optional_int,
    plan_choices,
    require_object,
    resolve_model,
    tool_call_choices,
)


def _system_text(system: object) -> str | None:
    if system is None or isinstance(system, str):
        return system or None
    if not isinstance(system, list):
        raise SimulatorRequestError("system: Input should be a valid string or list")
    parts = [
        block["text"]
        for block in system
        if isinstance(block, dict) and block.get("type") == "text" and block.get("text")
    ]
    return "".join(parts) or None


def _block(index: int, block: object, role: str, out: list[dict[str, object]]) -> object | None:
    """Convert one content block: a chat content part, a tool call, or a tool message
    appended to ``out`` (vLLM's order: before the rest of the user's message)."""
    if not isinstance(block, dict):
        raise SimulatorRequestError(f"messages.{index}.content: each block must be an object")
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text") or ""}
    if kind == "image":
        return {"type": "image_url"}
    if kind == "tool_use":
        arguments = json.dumps(block.get("input") or {})
        function = {"name": block.get("name") or "", "arguments": arguments}
        return {"tool_call": {"function": function}}
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            content = "\n".join(
                str(item.get("text", "")) for item in content if isinstance(item, dict)
            )
        result = content if isinstance(content, str) else ""
        if role == "user":
            out.append({"role": "tool", "content": result})
            return None
        return {"type": "text", "text": f"Tool result: {result}"}
    return None


def chat_messages(body: Mapping[str, object]) -> list[object]:
    """The chat conversation a Messages request stands for."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise SimulatorRequestError("messages: Input should be a non-empty list")
    out: list[dict[str, object]] = []
    system = _system_text(body.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in (
            "user",
            "assistant",
            "system",
        ):
            raise SimulatorRequestError(
                f"messages.{index}.role: Input should be 'user', 'assistant' or 'system'"
            )
        role = str(message["role"])
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise SimulatorRequestError(f"messages.{index}.content: Field required")
        parts: list[object] = []
        calls: list[object] = []
        for block in content:
            converted = _block(index, block, role, out)
            if isinstance(converted, dict) and "tool_call" in converted:
                calls.append(converted["tool_call"])
            elif converted is not None:
                parts.append(converted)
        if parts or calls or role != "user":
            out.append({"role": role, "content": parts or None, "tool_calls": calls or None})
    return list(out)


def _tools(body: Mapping[str, object]) -> tools.ToolChoice:
    raw = body.get("tools")
    offered: list[tools.Tool] = []
    if raw is not None:
        if not isinstance(raw, list):
            raise SimulatorRequestError("tools: Input should be a valid list")
        for i, tool in enumerate(raw):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise SimulatorRequestError(f"tools.{i}.name: Field required")
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise SimulatorRequestError(f"tools.{i}.input_schema: Field required")
            description = tool.get("description")
            offered.append(
                tools.Tool(
                    tool["name"], description if isinstance(description, str) else None, schema
                )
            )
    choice = body.get("tool_choice")
    if choice is None:
        return tools.ToolChoice(offered)
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise SimulatorRequestError(
            "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'"
        )
    if kind in ("auto", "none"):
        return tools.ToolChoice(offered)
    if not offered:
        raise SimulatorRequestError("When using `tool_choice`, `tools` must be set.")
    if kind == "any":
        return tools.ToolChoice(offered, offered[0])
    assert isinstance(choice, dict)
    name = choice.get("name")
    if not isinstance(name, str) or not name:
        raise SimulatorRequestError("tool_choice.name is required when type is 'tool'")
    return tools.ToolChoice(offered, tools.find_tool(offered, name), named=True)


def _render(body: Mapping[str, object], choice: tools.ToolChoice) -> RenderedPrompt:
    return render_chat(chat_messages(body), [tool.as_function() for tool in choice.tools])


def _model(config: SimulatorConfig, body: Mapping[str, object]) -> str:
    if not body.get("model"):
        raise SimulatorRequestError("model: Field required")
    return resolve_model(config, body.get("model"))


def count_input_tokens(config: SimulatorConfig, raw: object) -> int:
    """``/v1/messages/count_tokens``: what the same ``/v1/messages`` request's input costs."""
    body = require_object(raw)
    _model(config, body)
    return len(_render(body, _tools(body)).tokens)


def _ends_with_tool_result(body: Mapping[str, object]) -> bool:
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    content = last.get("content") if isinstance(last, dict) else None
    return isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    )


def _stop_sequences(body: Mapping[str, object]) -> list[str]:
    raw = body.get("stop_sequences")
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise SimulatorRequestError("stop_sequences: Input should be a valid list of strings")
    return [s for s in raw if s]


def apply_stop_sequences(choice: ChoicePlan, stops: list[str]) -> ChoicePlan:
    """Cut a text choice before the first stop sequence its text contains (vLLM leaves the
    stop string out); the tokens kept are those wholly before the match."""
    if not stops or choice.tool_call is not None or not choice.token_ids:
        return choice
    full = text.render_text(choice.token_ids)
    matches = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    if not matches:
        return choice
    _, start, stop = min(matches)
    kept = 0
    end = 0
    for i, token in enumerate(choice.token_ids):
        end += len((text.REST_TEXT if i else text.FIRST_TEXT)[token])
        if end > start:
            break
        kept = i + 1
    return ChoicePlan(choice.index, choice.token_ids[:kept], "stop", stop_sequence=stop)


def parse_messages(config: SimulatorConfig, raw: object) -> GenerationPlan:
    """Validate a ``/v1/messages`` body into a plan (one choice)."""
    body = require_object(raw)
    model = _model(config, body)
    max_tokens = optional_int(body, "max_tokens", 1)
    if max_tokens is None:
        raise SimulatorRequestError("max_tokens: Field required")
    choice = _tools(body)
    stops = _stop_sequences(body)
    rendered = _render(body, choice)
    prompt_tokens = len(rendered.tokens)
    check_context(config, prompt_tokens, max_tokens)
    stream = optional_bool(body, "stream")
    if choice.forced is not None and not _ends_with_tool_result(body):
        choices = tool_call_choices(choice, 1, max_tokens)
    else:
        planned = plan_choices(config, body, [rendered.seed], 1, max_tokens)
        choices = [apply_stop_sequences(c, stops) for c in planned]
    return GenerationPlan("messages", model, stream, True, prompt_tokens, max_tokens, choices)


def stop_reason(choice: ChoicePlan) -> str:
    """Anthropic's ``stop_reason`` for a choice, as vLLM maps it."""
    if choice.finish_reason == "length":
        return "max_tokens"
    if choice.tool_call is not None:
        return "tool_use"
    if choice.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def _sse(event_type: str, payload: dict[str, object]) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class MessagesReply:
    """The answer of ``/v1/messages`` to one plan."""

    def __init__(self, plan: GenerationPlan, message_id: str) -> None:
        """Remember the plan and the message id."""
        self.plan = plan
        self.message_id = message_id
        self.choice = plan.choices[0]

    def _usage(self, output_tokens: int) -> dict[str, object]:
        return {"input_tokens": self.plan.prompt_tokens, "output_tokens": output_tokens}

    def _content(self) -> list[dict[str, object]]:
        call = self.choice.tool_call
        if call is None:
            return [{"type": "text", "text": text.render_text(self.choice.token_ids)}]
        arguments: object = json.loads(call.arguments) if call.complete else {}
        return [{"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}]

    def opening(self) -> list[bytes]:
        """``message_start`` (usage: the input tokens) and the content block's start."""
        message: dict[str, object] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.plan.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._usage(0),
        }
        events = [_sse("message_start", {"type": "message_start", "message": message})]
        if self.choice.length:
            call = self.choice.tool_call
            block: dict[str, object] = (
                {"type": "text", "text": ""}
                if call is None
                else {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            )
            events.append(
                _sse(
                    "content_block_start",
                    {"type": "content_block_start", "content_block": block, "index": 0},
                )
            )
        return events

    def token(self, choice: ChoicePlan, step: int) -> bytes:
        """A ``text_delta``, or an ``input_json_delta`` piece of the tool's input."""
        call = choice.tool_call
        if call is None:
            table = text.REST_TEXT if step else text.FIRST_TEXT
            delta = {"type": "text_delta", "text": table[choice.token_ids[step]]}
        else:
            delta = {"type": "input_json_delta", "partial_json": call.pieces[step]}
        return _sse(
            "content_block_delta", {"type": "content_block_delta", "delta": delta, "index": 0}
        )

    def choice_end(self, choice: ChoicePlan) -> list[bytes]:
        """``content_block_stop``."""
        return [_sse("content_block_stop", {"type": "content_block_stop", "index": 0})]

    def closing(self, generated: int) -> list[bytes]:
        """``message_delta`` (stop reason, usage) and ``message_stop``."""
        choice = self.choice
        delta = {"stop_reason": stop_reason(choice), "stop_sequence": choice.stop_sequence}
        return [
            _sse(
                "message_delta",
                {"type": "message_delta", "delta": delta, "usage": self._usage(generated)},
            ),
            _sse("message_stop", {"type": "message_stop"}),
        ]

    def stream_error(self, message: str) -> list[bytes]:
        """vLLM's ``error`` event."""
        error = {"type": "internal_error", "message": message}
        return [_sse("error", {"type": "error", "error": error})]

    def error_body(self, message: str, status: int) -> bytes:
        """An error in the Messages API's shape."""
        return anthropic_error_body(message, error_type_for(status))

    def body(self) -> bytes:
        """The whole ``message`` object (vLLM leaves out what is ``None``)."""
        body: dict[str, object] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "content": self._content(),
            "model": self.plan.model,
            "stop_reason": stop_reason(self.choice),
        }
        if self.choice.stop_sequence is not None:
            body["stop_sequence"] = self.choice.stop_sequence
        body["usage"] = self._usage(self.plan.completion_tokens)
        return orjson.dumps(body)
