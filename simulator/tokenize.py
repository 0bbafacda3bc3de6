"""vLLM's ``/tokenize`` and ``/detokenize`` with the simulated tokenizer.

A prompt's tokens are its words; messages are rendered by the simulated chat template first
(``simulator.prompt``), so ``count`` is what a chat request with those messages reports as
``prompt_tokens``. Bodies are read and written with the standard ``json`` module: word ids can
pass 2**64, which ``orjson`` refuses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from simulator import tokenizer
from simulator.config import SimulatorConfig
from simulator.errors import SimulatorRequestError
from simulator.prompt import render_chat
from simulator.protocol import require_object, resolve_model
from simulator.tools import parse_openai_tools


def _flag(body: Mapping[str, object], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise SimulatorRequestError(f"{name}: Input should be a valid boolean")
    return value


def tokenize(config: SimulatorConfig, raw: object) -> bytes:
    """Answer ``POST /tokenize``: ``{"count", "max_model_len", "tokens", "token_strs"}``."""
    body = require_object(raw)
    resolve_model(config, body.get("model"))
    if "messages" in body:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise SimulatorRequestError("messages: Input should be a valid list")
        functions = [tool.as_function() for tool in parse_openai_tools(body).tools]
        words = render_chat(
            messages,
            functions,
            add_generation_prompt=_flag(body, "add_generation_prompt", True),
        ).tokens
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise SimulatorRequestError("prompt: Field required (a string, or give messages)")
        words = prompt.split()
    return json.dumps(
        {
            "count": len(words),
            "max_model_len": config.max_model_len,
            "tokens": tokenizer.encode(words),
            "token_strs": words if _flag(body, "return_token_strs", False) else None,
        }
    ).encode()


def detokenize(config: SimulatorConfig, raw: object) -> bytes:
    """Answer ``POST /detokenize``: ``{"prompt"}``."""
    body = require_object(raw)
    resolve_model(config, body.get("model"))
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens
    ):
        raise SimulatorRequestError("tokens: Input should be a list of non-negative integers")
    return json.dumps({"prompt": tokenizer.decode(tokens)}).encode()
