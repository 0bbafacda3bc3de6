"""Deterministic tool calling: which tool a request forces, and the call the simulator makes.

vLLM calls a tool for certain when ``tool_choice`` is ``"required"`` or names a function
(guided decoding); the simulator then calls the forced tool (the first one for
``"required"``) with each required property of its JSON schema set to a placeholder of its
type. ``"auto"`` and ``"none"`` get a text reply, as from an engine whose model chose not to
call. A conversation whose last message is a tool result is answered with text, so a test
can do a whole round trip with one ``tool_choice``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from simulator.errors import SimulatorRequestError

#: What a string property gets.
PLACEHOLDER_STRING = "simulated"
_PLACEHOLDERS: dict[str, object] = {
    "string": PLACEHOLDER_STRING,
    "integer": 1,
    "number": 1.5,
    "boolean": True,
    "array": [],
    "null": None,
}
_PIECE = re.compile(r"\s*\S+")


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the client offers: name, description, JSON schema of its arguments."""

    name: str
    description: str | None
    parameters: Mapping[str, object]

    def as_function(self) -> dict[str, object]:
        """The OpenAI ``function`` object (what the prompt renders)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """The tools a request offers and the one it forces (by name, or as "required")."""

    tools: list[Tool]
    forced: Tool | None = None
    named: bool = False


@dataclass(frozen=True, slots=True)
class ToolCallPlan:
    """The call a reply makes: its id, the tool, and its arguments as streamed pieces
    (one simulated token each); ``complete`` is false when ``max_tokens`` cut them."""

    id: str
    name: str
    pieces: tuple[str, ...]
    complete: bool
    #: Forced by name (vLLM then reports finish_reason "stop", not "tool_calls").
    named: bool = False

    @property
    def arguments(self) -> str:
        """The arguments JSON text (cut short when not ``complete``)."""
        return "".join(self.pieces)


def placeholder(schema: object) -> object:
    """A value of the JSON type ``schema`` describes: its first enum value, an object of its
    required properties, or the placeholder of its type."""
    if not isinstance(schema, Mapping):
        return PLACEHOLDER_STRING
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        required = schema.get("required")
        names = required if isinstance(required, list) else []
        return {str(name): placeholder(properties.get(name)) for name in names}
    if isinstance(kind, str):
        return _PLACEHOLDERS.get(kind, PLACEHOLDER_STRING)
    return PLACEHOLDER_STRING


def plan_call(tool: Tool, max_tokens: int, *, named: bool) -> ToolCallPlan:
    """The call of ``tool``, its arguments cut to ``max_tokens`` pieces."""
    arguments = json.dumps(placeholder(tool.parameters))
    pieces = tuple(_PIECE.findall(arguments))
    return ToolCallPlan(
        id=f"chatcmpl-tool-{uuid.uuid4().hex}",
        name=tool.name,
        pieces=pieces[:max_tokens],
        complete=len(pieces) <= max_tokens,
        named=named,
    )


def _openai_tool(index: int, raw: object) -> Tool:
    if not isinstance(raw, dict) or raw.get("type", "function") != "function":
        raise SimulatorRequestError(f"tools.{index}: only function tools are supported")
    function = raw.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise SimulatorRequestError(f"tools.{index}.function.name: Field required")
    description = function.get("description")
    parameters = function.get("parameters")
    return Tool(
        name=function["name"],
        description=description if isinstance(description, str) else None,
        parameters=parameters if isinstance(parameters, dict) else {},
    )


def parse_openai_tools(body: Mapping[str, object]) -> ToolChoice:
    """The tools of a chat request and the one its ``tool_choice`` forces (or ``None``),
    with vLLM's 400s for a choice that names no offered tool."""
    raw_tools = body.get("tools")
    choice = body.get("tool_choice")
    if raw_tools is None:
        if choice is not None and choice != "none":
            raise SimulatorRequestError("When using `tool_choice`, `tools` must be set.")
        return ToolChoice([])
    if not isinstance(raw_tools, list):
        raise SimulatorRequestError("tools: Input should be a valid list")
    if not raw_tools:
        raise SimulatorRequestError(
            "`tools` must not be an empty array. "
            "Either provide at least one tool or omit the field entirely."
        )
    tools = [_openai_tool(i, raw) for i, raw in enumerate(raw_tools)]
    if choice is None or choice in ("auto", "none"):
        return ToolChoice(tools)
    if choice == "required":
        return ToolChoice(tools, tools[0])
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise SimulatorRequestError(
                "Expected field `name` in `function` in `tool_choice`! Correct usage: "
                '`{"type": "function", "function": {"name": "my_function"}}`'
            )
        return ToolChoice(tools, find_tool(tools, name), named=True)
    raise SimulatorRequestError(
        f"Invalid value for `tool_choice`: {choice}! "
        'Only named tools, "none", "auto" or "required" are supported.'
    )


def find_tool(tools: Sequence[Tool], name: str) -> Tool:
    """The offered tool called ``name``; 400 in vLLM's words when there is none."""
    for tool in tools:
        if tool.name == name:
            return tool
    raise SimulatorRequestError(
        "The tool specified in `tool_choice` does not match any of the specified `tools`"
    )
