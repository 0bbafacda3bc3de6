"""Validation of OpenAI-style request bodies into simulated generation plans."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from simulator import text, tools
from simulator.config import SimulatorConfig
from simulator.errors import SimulatorRequestError
from simulator.prompt import render_chat

Endpoint = Literal["chat", "completion", "responses", "messages"]

#: Highest ``n`` accepted (vLLM has no hard cap; this keeps a typo from eating the host).
MAX_CHOICES = 128
#: ``max_tokens`` when a legacy completion request names none (OpenAI's and vLLM's default).
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: Upper bound of the default ``max_tokens`` of a chat request that names none.
DEFAULT_CHAT_MAX_TOKENS = 256


@dataclass(frozen=True, slots=True)
class ChoicePlan:
    """One choice of a generation: its index, tokens and why it ends."""

    index: int
    token_ids: list[int]
    #: The engine's reason ("stop" or "length"); each API names it its own way.
    finish_reason: str
    #: A tool call instead of text (its arguments' pieces are the tokens).
    tool_call: tools.ToolCallPlan | None = None
    #: The stop sequence that ended the text, if one did.
    stop_sequence: str | None = None

    @property
    def length(self) -> int:
        """Tokens this choice generates."""
        if self.tool_call is not None:
            return len(self.tool_call.pieces)
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class GenerationPlan:
    """Everything needed to answer a chat or completion request."""

    endpoint: Endpoint
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int
    max_tokens: int
    choices: list[ChoicePlan]

    @property
    def completion_tokens(self) -> int:
        """Tokens the full answer contains, all choices together."""
        return sum(choice.length for choice in self.choices)

    @property
    def steps(self) -> int:
        """Decode steps of the answer (the longest choice)."""
        return max((choice.length for choice in self.choices), default=0)


@dataclass(frozen=True, slots=True)
class EmbeddingPlan:
    """Everything needed to answer an embeddings request."""

    model: str
    inputs: list[str]
    prompt_tokens: int
    encoding_format: Literal["float", "base64"]
    dimensions: int | None


def require_object(body: object) -> Mapping[str, object]:
    if not isinstance(body, dict):
        raise SimulatorRequestError("The request body must be a JSON object.")
    return body


def resolve_model(config: SimulatorConfig, requested: object) -> str:
    """The served name a request addresses; 404 in vLLM's words for an unknown one."""
    if requested is None:
        return config.primary_name
    if not isinstance(requested, str):
        raise SimulatorRequestError("model: Input should be a valid string")
    if requested not in config.model_names:
        raise SimulatorRequestError(f"The model `{requested}` does not exist.", 404)
    return requested


def optional_int(body: Mapping[str, object], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SimulatorRequestError(f"{name}: Input should be a valid integer")
    if value < minimum:
        raise SimulatorRequestError(f"{name} must be at least {minimum}, got {value}.")
    return value


def optional_bool(body: Mapping[str, object], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SimulatorRequestError(f"{name}: Input should be a valid boolean")
    return value


def _include_usage(body: Mapping[str, object], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise SimulatorRequestError("Stream options can only be defined when `stream=True`.")
    if not isinstance(options, dict):
        raise SimulatorRequestError("stream_options: Input should be a valid dictionary")
    return optional_bool(options, "include_usage")


def check_context(config: SimulatorConfig, prompt_tokens: int, max_tokens: int) -> None:
    if prompt_tokens >= config.max_model_len:
        raise SimulatorRequestError(
            f"This model's maximum context length is {config.max_model_len} tokens. "
            f"However, your request has {prompt_tokens} input tokens. "
            "Please reduce the length of the input messages."
        )
    if prompt_tokens + max_tokens > config.max_model_len:
        raise SimulatorRequestError(
            f"This model's maximum context length is {config.max_model_len} tokens. "
            f"However, you requested {prompt_tokens + max_tokens} tokens "
            f"({prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )


def _max_tokens(body: Mapping[str, object]) -> int | None:
    explicit = optional_int(body, "max_completion_tokens", 1)
    if explicit is None:
        explicit = optional_int(body, "max_tokens", 1)
    return explicit


def plan_choices(
    config: SimulatorConfig,
    body: Mapping[str, object],
    seeds: list[int],
    n: int,
    max_tokens: int,
) -> list[ChoicePlan]:
    ignore_eos = optional_bool(body, "ignore_eos")
    min_tokens = optional_int(body, "min_tokens", 0) or 0
    request_seed = optional_int(body, "seed", -(2**63)) or 0
    plans: list[ChoicePlan] = []
    for prompt_index, prompt_seed in enumerate(seeds):
        for i in range(n):
            seed = (prompt_seed ^ (request_seed * 0x9E3779B1) ^ (i * 0x85EBCA77)) & 0xFFFFFFFF
            wanted = (
                max_tokens + 1 if ignore_eos else text.natural_length(seed, config.response_tokens)
            )
            wanted = max(wanted, min_tokens)
            length = min(wanted, max_tokens)
            finish = "length" if wanted >= max_tokens else "stop"
            plans.append(ChoicePlan(prompt_index * n + i, text.token_ids(seed, length), finish))
    return plans


def tool_call_choices(choice: tools.ToolChoice, n: int, max_tokens: int) -> list[ChoicePlan]:
    """``n`` choices that each call the forced tool ("length" when ``max_tokens`` cuts it)."""
    assert choice.forced is not None
    plans: list[ChoicePlan] = []
    for index in range(n):
        call = tools.plan_call(choice.forced, max_tokens, named=choice.named)
        finish = "stop" if call.complete else "length"
        plans.append(ChoicePlan(index, [], finish, tool_call=call))
    return plans


def parse_chat(config: SimulatorConfig, raw: object) -> GenerationPlan:
    """Validate a ``/v1/chat/completions`` body into a plan (vLLM's 400/404 on error)."""
    body = require_object(raw)
    model = resolve_model(config, body.get("model"))
    messages = body.get("messages")
    if messages is None:
        raise SimulatorRequestError("messages: Field required")
    if not isinstance(messages, list) or not messages:
        raise SimulatorRequestError("messages: Input should be a non-empty list")
    tool_choice = tools.parse_openai_tools(body)
    rendered = render_chat(messages, [tool.as_function() for tool in tool_choice.tools])
    prompt_tokens = len(rendered.tokens)
    stream = optional_bool(body, "stream")
    include_usage = _include_usage(body, stream)
    n = optional_int(body, "n", 1) or 1
    if n > MAX_CHOICES:
        raise SimulatorRequestError(f"n must be at most {MAX_CHOICES}, got {n}.")
    max_tokens = _max_tokens(body)
    if max_tokens is None:
        max_tokens = min(config.max_model_len - prompt_tokens, DEFAULT_CHAT_MAX_TOKENS)
        max_tokens = max(max_tokens, 1)
    check_context(config, prompt_tokens, max_tokens)
    if tool_choice.forced is not None and rendered.last_role != "tool":
        choices = tool_call_choices(tool_choice, n, max_tokens)
    else:
        choices = plan_choices(config, body, [rendered.seed], n, max_tokens)
    return GenerationPlan("chat", model, stream, include_usage, prompt_tokens, max_tokens, choices)


def _prompt_list(raw: object, field: str) -> list[tuple[str, int]]:
    """Split a prompt/input field into ``(text, tokens)`` pairs (strings or token ids)."""
    if isinstance(raw, str):
        return [(raw, max(text.count_tokens(raw), 1))]
    if not isinstance(raw, list) or not raw:
        raise SimulatorRequestError(f"{field}: Input should be a non-empty string or list")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        return [(" ".join(map(str, raw)), len(raw))]
    out: list[tuple[str, int]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            out.append((item, max(text.count_tokens(item), 1)))
        elif (
            isinstance(item, list)
            and item
            and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
        ):
            out.append((" ".join(map(str, item)), len(item)))
        else:
            raise SimulatorRequestError(
                f"{field}.{i}: Input should be a string or a non-empty list of token ids"
            )
    return out


def parse_completion(config: SimulatorConfig, raw: object) -> GenerationPlan:
    """Validate a ``/v1/completions`` body into a plan (one prompt or a list of them)."""
    body = require_object(raw)
    model = resolve_model(config, body.get("model"))
    if body.get("prompt") is None:
        raise SimulatorRequestError("prompt: Field required")
    prompts = _prompt_list(body.get("prompt"), "prompt")
    stream = optional_bool(body, "stream")
    include_usage = _include_usage(body, stream)
    n = optional_int(body, "n", 1) or 1
    if n * len(prompts) > MAX_CHOICES:
        raise SimulatorRequestError(f"n times the number of prompts must be at most {MAX_CHOICES}.")
    max_tokens = _max_tokens(body) or DEFAULT_COMPLETION_MAX_TOKENS
    for _, tokens in prompts:
        check_context(config, tokens, max_tokens)
    seeds = [text.text_seed(prompt) for prompt, _ in prompts]
    choices = plan_choices(config, body, seeds, n, max_tokens)
    prompt_tokens = sum(tokens for _, tokens in prompts)
    return GenerationPlan(
        "completion", model, stream, include_usage, prompt_tokens, max_tokens, choices
    )


def parse_embedding(config: SimulatorConfig, raw: object) -> EmbeddingPlan:
    """Validate a ``/v1/embeddings`` body into a plan."""
    body = require_object(raw)
    model = resolve_model(config, body.get("model"))
    if body.get("input") is None:
        raise SimulatorRequestError("input: Field required")
    inputs = _prompt_list(body.get("input"), "input")
    for _, tokens in inputs:
        if tokens > config.max_model_len:
            raise SimulatorRequestError(
                f"This model's maximum context length is {config.max_model_len} tokens. "
                f"However, you requested {tokens} tokens in the input for embedding "
                "generation. Please reduce the length of the input."
            )
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise SimulatorRequestError("encoding_format: Input should be 'float' or 'base64'")
    dimensions = optional_int(body, "dimensions", 1)
    if dimensions is not None and dimensions > config.embedding_dim:
        raise SimulatorRequestError(
            f"dimensions must be at most {config.embedding_dim} for this model, got {dimensions}."
        )
    return EmbeddingPlan(
        model=model,
        inputs=[item for item, _ in inputs],
        prompt_tokens=sum(tokens for _, tokens in inputs),
        encoding_format="float" if encoding == "float" else "base64",
        dimensions=dimensions,
    )
