"""The relay's SSE splitter: the same events whatever the network chunking."""

from __future__ import annotations

import random

import pytest

from gateway.proxy.upstream import SSEDecoder

STREAM = (
    b'data: {"id":"1","choices":[{"delta":{"content":"he"}}]}\n\n'
    b": a comment line\n\n"
    b"event: ping\nid: 7\n\n"
    b'data: {"id":"2",\ndata: "x":1}\n\n'
    b'data:{"no":"space"}\r\n\r\n'
    b"data: [DONE]\n\n"
    b"data: unterminated"
)
EXPECTED = [
    b'{"id":"1","choices":[{"delta":{"content":"he"}}]}',
    b'{"id":"2",\n"x":1}',
    b'{"no":"space"}',
    b"[DONE]",
]


def _decode(chunks: list[bytes]) -> list[bytes]:
    decoder = SSEDecoder()
    events: list[bytes] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def test_whole_stream_at_once() -> None:
    assert _decode([STREAM]) == EXPECTED


@pytest.mark.parametrize("seed", range(200))
def test_any_chunking_gives_the_same_events(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 40)))
    chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
    assert _decode(chunks) == EXPECTED


def test_byte_by_byte_with_crlf_split_across_reads() -> None:
    stream = b"data: a\r\n\r\ndata: b\r\n\r\n"
    assert _decode([bytes([b]) for b in stream]) == [b"a", b"b"]
