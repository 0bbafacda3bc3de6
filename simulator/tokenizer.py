"""The simulated tokenizer: one token per whitespace-separated word, reversible ids.

Ids 0..63 are the generation vocabulary (``text.FIRST_TEXT``), so a generated reply tokenizes
to vocabulary ids (a word the vocabulary holds twice gets its first index); ids from 64 are
the chat template's special markers; every other word is encoded in its id (its UTF-8 bytes
behind a marker byte, offset by ``WORD_ID_BASE``), so detokenize needs no table and the
simulator keeps no word it has seen.
Words longer than seven bytes get ids above 2**63: JSON carries them exactly, but a client
that reads JSON numbers as doubles (JavaScript) would not.
"""

from __future__ import annotations

from collections.abc import Sequence

from simulator import text
from simulator.errors import SimulatorRequestError

#: Markers of the simulated chat template (see ``simulator.prompt``).
MESSAGE_START = "<|im_start|>"
MESSAGE_SEP = "<|sep|>"
MESSAGE_END = "<|im_end|>"
MEDIA = "<|media|>"
TOOL_START = "<|tool|>"
TOOL_END = "<|tool_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    MESSAGE_START,
    MESSAGE_SEP,
    MESSAGE_END,
    MEDIA,
    TOOL_START,
    TOOL_END,
)

_VOCAB_IDS: dict[str, int] = {}
for _index, _word in enumerate(text.FIRST_TEXT):
    _VOCAB_IDS.setdefault(_word, _index)
_SPECIAL_BASE = text.VOCAB_SIZE
_SPECIAL_IDS = {word: _SPECIAL_BASE + index for index, word in enumerate(SPECIAL_TOKENS)}
#: First id of a word outside the vocabulary and the markers.
WORD_ID_BASE = 128
_WORD_MARKER = b"\x01"


def token_id(word: str) -> int:
    """The id of one simulated token (a word without whitespace)."""
    known = _VOCAB_IDS.get(word)
    if known is None:
        known = _SPECIAL_IDS.get(word)
    if known is not None:
        return known
    encoded = _WORD_MARKER + word.encode("utf-8", "surrogatepass")
    return WORD_ID_BASE + int.from_bytes(encoded, "big")


def token_text(token: int) -> str:
    """The word of a token id; 400 for an id no word has."""
    if 0 <= token < text.VOCAB_SIZE:
        return text.FIRST_TEXT[token]
    if _SPECIAL_BASE <= token < _SPECIAL_BASE + len(SPECIAL_TOKENS):
        return SPECIAL_TOKENS[token - _SPECIAL_BASE]
    if token >= WORD_ID_BASE:
        value = token - WORD_ID_BASE
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        if raw.startswith(_WORD_MARKER):
            try:
                return raw[1:].decode("utf-8")
            except UnicodeDecodeError:
                pass
    raise SimulatorRequestError(f"Token id {token} is out of vocabulary")


def encode(words: Sequence[str]) -> list[int]:
    """The ids of ``words``."""
    return [token_id(word) for word in words]


def decode(tokens: Sequence[int]) -> str:
    """The text of ``tokens``: their words joined by single spaces."""
    return " ".join(token_text(token) for token in tokens)
