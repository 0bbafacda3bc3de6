"""The history sent upstream: which messages, and how many fit the model's context.

Rule: only `complete` messages go upstream, in order (the caller filters them). Then the newest
messages are kept while they fit the model's context (its profile's max_model_len, else
CHAT_DEFAULT_CONTEXT) minus the reply's reserve (`max_tokens` if given, else
CHAT_RESERVED_REPLY_TOKENS, at most a quarter of the context), counting CHAT_BYTES_PER_TOKEN
UTF-8 bytes per token plus 4 per message; system messages are always kept. A new message that
cannot fit alone is a 400.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.chat.deps import ChatResources
from gateway.errors import GatewayError
from gateway.proxy.scheduler import CURRENT

MESSAGE_OVERHEAD_TOKENS = 4


def _bad(message: str, param: str | None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def context_window(state: ChatResources, model: str | None) -> int:
    """The context length of the model that will answer (its profile's, else the default)."""
    control = state.models
    status = control.status()
    profile_id = status.profile_id
    if model and model != CURRENT and model not in status.served_names:
        profile_id = next(
            (pid for pid in control.verdicts() if model in control.profile(pid).served_names),
            None,
        )
    if profile_id is None:
        return state.settings.CHAT_DEFAULT_CONTEXT
    verdict = control.verdicts().get(profile_id)
    if verdict is not None and verdict.max_model_len:
        return verdict.max_model_len
    try:
        length = control.profile(profile_id).max_model_len
    except KeyError:
        length = None
    return length or state.settings.CHAT_DEFAULT_CONTEXT


def trim_history(
    messages: Sequence[dict[str, str]],
    *,
    context_tokens: int,
    reply_tokens: int | None,
    default_reserve: int,
    bytes_per_token: float,
) -> list[dict[str, str]]:
    """The newest messages that fit the context (system messages always kept); see module doc."""
    reserve = (
        reply_tokens if reply_tokens is not None else min(default_reserve, context_tokens // 4)
    )
    budget = context_tokens - reserve
    if budget <= 0:
        raise _bad(
            f"'max_tokens' ({reserve}) leaves no room for the conversation in the model's "
            f"context of {context_tokens} tokens.",
            "max_tokens",
            "context_length_exceeded",
        )

    def cost(message: dict[str, str]) -> int:
        size = len(message["content"].encode())
        return math.ceil(size / bytes_per_token) + MESSAGE_OVERHEAD_TOKENS

    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    used = sum(cost(m) for m in system)
    kept: list[dict[str, str]] = []
    for message in reversed(rest):
        needed = cost(message)
        if used + needed > budget:
            break
        kept.append(message)
        used += needed
    if rest and not kept:
        raise _bad(
            f"The message is too long for the model's context of {context_tokens} tokens "
            f"(with {reserve} kept for the reply).",
            "message",
            "context_length_exceeded",
        )
    return system + kept[::-1]
