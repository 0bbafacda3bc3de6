"""The simulated chat template: OpenAI-style messages (and tools) rendered into tokens.

Every API that takes messages (chat, responses, messages, tokenize) renders them here, so
the same conversation costs the same prompt tokens on each and ``/tokenize`` counts what a
generation request reports. A message is ``<|im_start|> role [name] <|sep|> words
<|im_end|>`` (``text.CHAT_MESSAGE_OVERHEAD`` tokens around its content); a non-text content
part costs ``text.NON_TEXT_PART_TOKENS`` media tokens; the reply priming is ``<|im_start|>
assistant <|sep|>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from simulator import text
from simulator.errors import SimulatorRequestError
from simulator.tokenizer import (
    MEDIA,
    MESSAGE_END,
    MESSAGE_SEP,
    MESSAGE_START,
    TOOL_END,
    TOOL_START,
)

_PRIMING = (MESSAGE_START, "assistant", MESSAGE_SEP)
assert len(_PRIMING) == text.CHAT_REPLY_PRIMING


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """The prompt's tokens (words) and the seed its reply is generated from."""

    tokens: list[str]
    seed: int
    last_role: str


def _content_tokens(index: int, content: object, out: list[str]) -> str:
    """Append the tokens of a message's content; return its text for the seed."""
    if isinstance(content, str):
        out.extend(content.split())
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise SimulatorRequestError(
            f"messages.{index}.content: Input should be a valid string or list"
        )
    seen = ""
    for part in content:
        if not isinstance(part, dict):
            raise SimulatorRequestError(f"messages.{index}.content: each part must be a dictionary")
        part_text = part.get("text")
        if part.get("type") == "text" and isinstance(part_text, str):
            out.extend(part_text.split())
            seen += part_text
        else:
            out.extend([MEDIA] * text.NON_TEXT_PART_TOKENS)
    return seen


def _tool_call_tokens(index: int, calls: object, out: list[str]) -> None:
    """An assistant message's earlier tool calls: each one's name and argument words."""
    if calls is None:
        return
    if not isinstance(calls, list):
        raise SimulatorRequestError(f"messages.{index}.tool_calls: Input should be a valid list")
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise SimulatorRequestError(
                f"messages.{index}.tool_calls: each call needs a function object"
            )
        name = function.get("name")
        arguments = function.get("arguments")
        out.append(name if isinstance(name, str) else "")
        if isinstance(arguments, str):
            out.extend(arguments.split())


def _message(index: int, message: object, out: list[str]) -> tuple[str, str]:
    """Append one message's tokens; return its role and its text for the seed."""
    if not isinstance(message, dict):
        raise SimulatorRequestError(f"messages.{index}: Input should be a valid dictionary")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise SimulatorRequestError(f"messages.{index}.role: Field required")
    out.append(MESSAGE_START)
    out.append(role)
    name = message.get("name")
    if isinstance(name, str):
        out.append(name)
    out.append(MESSAGE_SEP)
    seen = role + _content_tokens(index, message.get("content"), out)
    _tool_call_tokens(index, message.get("tool_calls"), out)
    out.append(MESSAGE_END)
    return role, seen


def _tool(tool: Mapping[str, object], out: list[str]) -> None:
    """A tool definition: its name, description words and parameter names."""
    out.append(TOOL_START)
    name = tool.get("name")
    out.append(name if isinstance(name, str) else "")
    description = tool.get("description")
    if isinstance(description, str):
        out.extend(description.split())
    schema = tool.get("parameters")
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if isinstance(properties, dict):
        out.extend(str(key) for key in properties)
    out.append(TOOL_END)


def render_chat(
    messages: Sequence[object],
    tools: Sequence[Mapping[str, object]] = (),
    *,
    add_generation_prompt: bool = True,
) -> RenderedPrompt:
    """Render messages (and the functions of ``tools``: ``name``, ``description``,
    ``parameters``) into prompt tokens; 400 in vLLM's words for a malformed message."""
    tokens: list[str] = []
    for tool in tools:
        _tool(tool, tokens)
    seed = 0
    role = ""
    for index, message in enumerate(messages):
        role, seen = _message(index, message, tokens)
        seed = text.text_seed(seen, seed)
    if add_generation_prompt:
        tokens.extend(_PRIMING)
    return RenderedPrompt(tokens, seed, role)
