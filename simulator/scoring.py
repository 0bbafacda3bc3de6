"""vLLM's scoring APIs: ``/rerank`` (and ``/v1``, ``/v2``) and ``/score`` (and ``/v1``).

A pair's score is the overlap of its words (Jaccard: shared words over all distinct words,
case folded), so a document that repeats the query ranks first and tests can predict the
order. A pair costs the tokens of both texts. Text inputs only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from simulator import text
from simulator.config import SimulatorConfig
from simulator.errors import SimulatorRequestError
from simulator.protocol import optional_int, require_object, resolve_model

#: The field pairs ``/score`` accepts, in the order vLLM's request union tries them.
_SCORE_FIELDS = (
    ("queries", "documents"),
    ("queries", "items"),
    ("data_1", "data_2"),
    ("text_1", "text_2"),
)


@dataclass(frozen=True, slots=True)
class ScoringResult:
    """An answer's body and the prompt tokens it cost."""

    body: bytes
    prompt_tokens: int


def overlap_score(query: str, document: str) -> float:
    """The Jaccard overlap of the two texts' case-folded words, in [0, 1]."""
    a = set(query.casefold().split())
    b = set(document.casefold().split())
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def _texts(value: object, field: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in items):
        raise SimulatorRequestError(f"{field}: only text inputs are supported by this model")
    return [str(item) for item in items]


def _pairs(config: SimulatorConfig, left: list[str], right: list[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: 1:N (the one query with each) or N:N (zipped)."""
    if not left:
        raise SimulatorRequestError("At least one text element must be given")
    if not right:
        raise SimulatorRequestError("At least one text_pair element must be given")
    if len(left) > 1 and len(left) != len(right):
        raise SimulatorRequestError("Input lengths must be either 1:1, 1:N or N:N")
    pairs = list(zip(left * len(right) if len(left) == 1 else left, right, strict=True))
    for query, document in pairs:
        tokens = text.count_tokens(query) + text.count_tokens(document)
        if tokens > config.max_model_len:
            raise SimulatorRequestError(
                f"This model's maximum context length is {config.max_model_len} tokens. "
                f"However, you requested {tokens} tokens in the input for scoring. "
                "Please reduce the length of the input."
            )
    return pairs


def _tokens(pairs: list[tuple[str, str]]) -> int:
    return sum(text.count_tokens(q) + text.count_tokens(d) for q, d in pairs)


def rerank(config: SimulatorConfig, raw: object, request_id: str) -> ScoringResult:
    """Answer a rerank request: results sorted by relevance, the first ``top_n`` if set."""
    body = require_object(raw)
    model = resolve_model(config, body.get("model"))
    if body.get("query") is None:
        raise SimulatorRequestError("query: Field required")
    if body.get("documents") is None:
        raise SimulatorRequestError("documents: Field required")
    query = _texts(body["query"], "query")
    if len(query) != 1:
        raise SimulatorRequestError("query: Input should be a valid string")
    documents = _texts(body["documents"], "documents")
    pairs = _pairs(config, query, documents)
    top_n = optional_int(body, "top_n", 0) or len(documents)
    scored = sorted(
        ((overlap_score(q, d), i, d) for i, (q, d) in enumerate(pairs)),
        key=lambda entry: entry[0],
        reverse=True,
    )
    results = [
        {"index": i, "document": {"text": d, "multi_modal": None}, "relevance_score": s}
        for s, i, d in scored
    ]
    tokens = _tokens(pairs)
    answer = {
        "id": request_id,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": results[:top_n],
    }
    return ScoringResult(orjson.dumps(answer), tokens)


def _score_fields(body: Mapping[str, object]) -> tuple[object, object]:
    for left, right in _SCORE_FIELDS:
        if body.get(left) is not None and body.get(right) is not None:
            return body[left], body[right]
    raise SimulatorRequestError(
        "queries and documents (or queries and items, data_1 and data_2, text_1 and text_2): "
        "Field required"
    )


def score(config: SimulatorConfig, raw: object, request_id: str) -> ScoringResult:
    """Answer a score request: one ``score`` per pair, in pair order."""
    body = require_object(raw)
    model = resolve_model(config, body.get("model"))
    left, right = _score_fields(body)
    pairs = _pairs(config, _texts(left, "queries"), _texts(right, "documents"))
    tokens = _tokens(pairs)
    answer = {
        "id": request_id,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [
            {"index": i, "object": "score", "score": overlap_score(q, d)}
            for i, (q, d) in enumerate(pairs)
        ],
        "usage": {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
    }
    return ScoringResult(orjson.dumps(answer), tokens)
