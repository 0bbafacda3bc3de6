"""vLLM's OpenAI Responses API (``/v1/responses``) without its response store.

The input (a string, or message items whose content is a string or ``input_text`` parts)
and the ``instructions`` (a system message first) are rendered by the simulated chat
template, so they cost what the same messages cost on ``/v1/chat/completions``. The stream
is vLLM's: ``event: <type>`` lines, a ``sequence_number`` on each event, one
``response.output_text.delta`` per token, ``response.completed`` last and no ``[DONE]``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence

import orjson

from simulator import text
from simulator.config import SimulatorConfig
from simulator.errors import SimulatorRequestError, error_body
from simulator.prompt import render_chat
from simulator.protocol import (
    GenerationPlan,
    optional_bool,
    optional_int,
    plan_choices,
    require_object,
    resolve_model,
)

_INPUT_PART_TYPES = {"input_text": "text", "output_text": "text", "text": "text"}


def _number(body: Mapping[str, object], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SimulatorRequestError(f"{name}: Input should be a valid number")
    return float(value)


def _item_message(index: int, item: object) -> dict[str, object]:
    """An input item as a chat message (``input_text`` parts become text parts)."""
    if not isinstance(item, dict):
        raise SimulatorRequestError(f"input.{index}: Input should be a valid dictionary")
    kind = item.get("type", "message")
    if kind == "function_call":
        call = {"name": item.get("name"), "arguments": item.get("arguments")}
        tool_call = {"id": item.get("call_id"), "type": "function", "function": call}
        return {"role": "assistant", "content": None, "tool_calls": [tool_call]}
    if kind == "function_call_output":
        output = item.get("output")
        return {"role": "tool", "content": output if isinstance(output, str) else ""}
    if kind != "message":
        raise SimulatorRequestError(f"input.{index}: item type {kind!r} is not supported")
    content = item.get("content")
    if isinstance(content, list):
        parts: list[object] = []
        for part in content:
            if not isinstance(part, dict):
                raise SimulatorRequestError(f"input.{index}.content: each part must be an object")
            part_type = _INPUT_PART_TYPES.get(str(part.get("type")))
            parts.append({**part, "type": part_type} if part_type else part)
        content = parts
    return {"role": item.get("role"), "content": content}


def input_messages(body: Mapping[str, object]) -> list[object]:
    """The chat messages a Responses request stands for: instructions, then the input."""
    raw = body.get("input")
    if raw is None:
        raise SimulatorRequestError("input: Field required")
    messages: list[object] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise SimulatorRequestError("instructions: Input should be a valid string")
        messages.append({"role": "system", "content": instructions})
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list) and raw:
        messages.extend(_item_message(i, item) for i, item in enumerate(raw))
    else:
        raise SimulatorRequestError("input: Input should be a string or a non-empty list")
    return messages


def parse_responses(
    config: SimulatorConfig, raw: object
) -> tuple[GenerationPlan, dict[str, object]]:
    """Validate a ``/v1/responses`` body into a plan and the request fields the response
    object echoes."""
    body = require_object(raw)
    model = resolve_model(config, body.get("model"))
    rendered = render_chat(input_messages(body))
    prompt_tokens = len(rendered.tokens)
    if prompt_tokens >= config.max_model_len:
        raise SimulatorRequestError(
            f"The engine prompt length {prompt_tokens} exceeds the max_model_len "
            f"{config.max_model_len}. Please reduce prompt."
        )
    room = config.max_model_len - prompt_tokens
    requested = optional_int(body, "max_output_tokens", 1)
    max_tokens = room if requested is None else min(requested, room)
    stream = optional_bool(body, "stream")
    choices = plan_choices(config, body, [rendered.seed], 1, max_tokens)
    plan = GenerationPlan("responses", model, stream, True, prompt_tokens, max_tokens, choices)
    tools = body.get("tools")
    echo: dict[str, object] = {
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata"),
        "temperature": _number(body, "temperature", 1.0),
        "top_p": _number(body, "top_p", 1.0),
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": tools if isinstance(tools, list) else [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "previous_response_id": body.get("previous_response_id"),
        "user": body.get("user"),
        "truncation": body.get("truncation") or "disabled",
        "service_tier": body.get("service_tier") or "auto",
    }
    return plan, echo


def not_found(response_id: str) -> SimulatorRequestError:
    """vLLM's answer to ``GET /v1/responses/{id}`` and ``.../cancel`` without a store."""
    return SimulatorRequestError(
        f"Response with id '{response_id}' not found.",
        404,
        "invalid_request_error",
        param="response_id",
    )


def _sse(event_type: str, payload: bytes) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + payload + b"\n\n"


class ResponsesReply:
    """The answer of ``/v1/responses`` to one plan (one message item, one text part)."""

    def __init__(self, plan: GenerationPlan, response_id: str, echo: dict[str, object]) -> None:
        """Fix the ids and the creation time every event repeats."""
        self.plan = plan
        self.response_id = response_id
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.echo = echo
        self.sequence = 0
        choice = plan.choices[0]
        self.text = text.render_text(choice.token_ids)
        self.status = "incomplete" if choice.finish_reason == "length" else "completed"
        # The delta events' bytes around each token: {"content_index":..,"delta":<tok>,...}.
        self._delta_head = b'{"content_index":0,"delta":'
        self._delta_tail = (
            b',"item_id":"'
            + self.item_id.encode()
            + b'","logprobs":[],"output_index":0,"sequence_number":'
        )

    def _event(self, event_type: str, fields: dict[str, object]) -> bytes:
        payload = {**fields, "sequence_number": self.sequence, "type": event_type}
        self.sequence += 1
        return _sse(event_type, orjson.dumps(payload))

    def response_object(
        self, status: str, output: Sequence[object], usage: object
    ) -> dict[str, object]:
        """vLLM's ``response`` object (``ResponsesResponse.from_request``)."""
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.response_id,
            "created_at": self.created,
            "incomplete_details": incomplete,
            "instructions": self.echo["instructions"],
            "metadata": self.echo["metadata"],
            "model": self.plan.model,
            "object": "response",
            "output": list(output),
            "parallel_tool_calls": self.echo["parallel_tool_calls"],
            "temperature": self.echo["temperature"],
            "tool_choice": self.echo["tool_choice"],
            "tools": self.echo["tools"],
            "top_p": self.echo["top_p"],
            "background": False,
            "max_output_tokens": self.plan.max_tokens,
            "max_tool_calls": None,
            "previous_response_id": self.echo["previous_response_id"],
            "prompt": None,
            "reasoning": None,
            "service_tier": self.echo["service_tier"],
            "status": status,
            "text": None,
            "top_logprobs": None,
            "truncation": self.echo["truncation"],
            "usage": usage,
            "user": self.echo["user"],
            "presence_penalty": None,
            "frequency_penalty": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "input_messages": None,
            "output_messages": None,
        }

    def _part(self, logprobs: object) -> dict[str, object]:
        return {"annotations": [], "text": self.text, "type": "output_text", "logprobs": logprobs}

    def _message(self, status: str, content: Sequence[object]) -> dict[str, object]:
        return {
            "id": self.item_id,
            "content": list(content),
            "role": "assistant",
            "status": status,
            "type": "message",
        }

    def _usage(self, output_tokens: int) -> dict[str, object]:
        prompt = self.plan.prompt_tokens
        return {
            "input_tokens": prompt,
            "input_tokens_details": {
                "cached_tokens": 0,
                "cache_write_tokens": 0,
                "input_tokens_per_turn": [],
                "cached_tokens_per_turn": [],
            },
            "output_tokens": output_tokens,
            "output_tokens_details": {
                "reasoning_tokens": 0,
                "tool_output_tokens": 0,
                "output_tokens_per_turn": [],
                "tool_output_tokens_per_turn": [],
            },
            "total_tokens": prompt + output_tokens,
        }

    def opening(self) -> list[bytes]:
        """``response.created``, ``response.in_progress``, the message item and its part."""
        initial = self.response_object("in_progress", [], None)
        return [
            self._event("response.created", {"response": initial}),
            self._event("response.in_progress", {"response": initial}),
            self._event(
                "response.output_item.added",
                {"output_index": 0, "item": self._message("in_progress", [])},
            ),
            self._event(
                "response.content_part.added",
                {
                    "output_index": 0,
                    "item_id": self.item_id,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                },
            ),
        ]

    def token(self, choice: object, step: int) -> bytes:
        """One ``response.output_text.delta`` event."""
        ids = self.plan.choices[0].token_ids
        table = text.REST_JSON if step else text.FIRST_JSON
        payload = b"".join(
            (
                self._delta_head,
                table[ids[step]],
                self._delta_tail,
                b"%d" % self.sequence,
                b',"type":"response.output_text.delta"}',
            )
        )
        self.sequence += 1
        return _sse("response.output_text.delta", payload)

    def choice_end(self, choice: object) -> list[bytes]:
        """The text, its part and its item, done."""
        part = self._part(None)
        common = {"output_index": 0, "item_id": self.item_id, "content_index": 0}
        return [
            self._event("response.output_text.done", {**common, "text": self.text, "logprobs": []}),
            self._event("response.content_part.done", {**common, "part": part}),
            self._event(
                "response.output_item.done",
                {"output_index": 0, "item": self._message("completed", [part])},
            ),
        ]

    def closing(self, generated: int) -> list[bytes]:
        """``response.completed`` with the whole response and its usage (no ``[DONE]``)."""
        output = [self._message("completed", [self._part(None)])]
        response = self.response_object(self.status, output, self._usage(generated))
        return [self._event("response.completed", {"response": response})]

    def stream_error(self, message: str) -> list[bytes]:
        """An ``error`` event (the Responses stream's error shape) ends the stream."""
        return [
            self._event("error", {"code": "InternalServerError", "message": message, "param": None})
        ]

    def error_body(self, message: str, status: int) -> bytes:
        """vLLM's error object."""
        return error_body(message, status)

    def body(self) -> bytes:
        """The whole ``response`` object."""
        content = [self._part(None)] if self.text else []
        output = [self._message("completed", content)]
        usage = self._usage(self.plan.completion_tokens)
        return orjson.dumps(self.response_object(self.status, output, usage))
