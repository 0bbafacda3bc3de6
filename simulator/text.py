"""Deterministic pseudo-text for the simulator: token generation, counting and embeddings.

One simulated token is one whitespace-separated word, so ``count_tokens`` applied to a
generated completion gives back exactly the number of tokens generated.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import zlib
from collections.abc import Sequence

import orjson

_VOCABULARY_TEXT = """
    the simulated engine writes plain words so every token is one word, and nothing here
    comes from a real model. Streams arrive chunk by chunk while the gateway forwards
    them to clients. Latency throughput quotas users conversations stay under test; no
    GPU was harmed in making this text. Deterministic output follows the prompt seed
    exactly each time it runs, which keeps tests stable today.
"""
_WORDS: tuple[str, ...] = tuple(_VOCABULARY_TEXT.split())

VOCAB_SIZE = len(_WORDS)
_VOCAB_MASK = VOCAB_SIZE - 1
assert VOCAB_SIZE & _VOCAB_MASK == 0, "vocabulary size must be a power of two"

#: Text of a token at the start of a completion, and everywhere else (leading space).
FIRST_TEXT: tuple[str, ...] = _WORDS
REST_TEXT: tuple[str, ...] = tuple(" " + word for word in _WORDS)
#: The same texts, already JSON-encoded (quotes included) for building SSE chunks.
FIRST_JSON: tuple[bytes, ...] = tuple(orjson.dumps(text) for text in FIRST_TEXT)
REST_JSON: tuple[bytes, ...] = tuple(orjson.dumps(text) for text in REST_TEXT)

_MASK64 = (1 << 64) - 1
_LCG_MUL = 6364136223846793005
_LCG_INC = 1442695040888963407

#: Per-message overhead in chat prompts (role markers), and the assistant priming.
CHAT_MESSAGE_OVERHEAD = 4
CHAT_REPLY_PRIMING = 3
#: What a non-text content part (an image, audio...) costs in prompt tokens.
NON_TEXT_PART_TOKENS = 16


def count_tokens(text: str) -> int:
    """Count the simulated tokens of ``text``: its whitespace-separated words."""
    return len(text.split())


def text_seed(text: str, seed: int = 0) -> int:
    """A 32-bit seed derived from ``text`` (and an optional previous seed)."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass"), seed & 0xFFFFFFFF)


def token_ids(seed: int, count: int) -> list[int]:
    """The vocabulary indices of ``count`` tokens generated from ``seed``."""
    state = (seed * 2654435761 + 1) & _MASK64
    out = [0] * count
    for i in range(count):
        state = (state * _LCG_MUL + _LCG_INC) & _MASK64
        out[i] = (state >> 33) & _VOCAB_MASK
    return out


def render_text(ids: Sequence[int]) -> str:
    """The completion text made of the tokens ``ids``."""
    if not ids:
        return ""
    rest = REST_TEXT
    return FIRST_TEXT[ids[0]] + "".join([rest[i] for i in ids[1:]])


def natural_length(seed: int, fixed: int) -> int:
    """How many tokens a reply "wants" before its end-of-sequence token.

    ``fixed`` (the ``--response-tokens`` setting) wins when positive; otherwise the
    length is derived from the seed, between 16 and 128 tokens.
    """
    if fixed > 0:
        return fixed
    return 16 + (seed >> 7) % 113


def embedding_vector(text: str, dim: int) -> list[float]:
    """A deterministic unit-norm vector of ``dim`` floats derived from ``text``."""
    raw = hashlib.shake_256(text.encode("utf-8", "surrogatepass")).digest(2 * dim)
    values = struct.unpack(f"<{dim}h", raw)
    norm = math.sqrt(math.fsum(v * v for v in values))
    if norm == 0.0:
        return [1.0] + [0.0] * (dim - 1)
    return [v / norm for v in values]


def truncate_normalized(vector: list[float], dim: int) -> list[float]:
    """Keep the first ``dim`` components of ``vector`` and re-normalize them."""
    head = vector[:dim]
    norm = math.sqrt(math.fsum(v * v for v in head))
    if norm == 0.0:
        return [1.0] + [0.0] * (dim - 1)
    return [v / norm for v in head]


def encode_base64(vector: Sequence[float]) -> str:
    """Little-endian float32 bytes of ``vector`` in base64, as OpenAI's API returns them."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
