"""orchestrator/gguf.py: the header of the real tiny GGUF, and hand-made files good and bad."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from orchestrator.gguf import (
    BITS_PER_WEIGHT,
    FILE_TYPE_NAMES,
    GGML_TYPES,
    KEEP_ARRAY_VALUES,
    GgufArray,
    GgufError,
    GgufValueType,
    estimate_weight_bytes,
    read_gguf,
)
from tests.helpers.llama_cpp_engine import gguf_py_dir

V = GgufValueType
Value = tuple[GgufValueType, object]
_FORMATS = {
    V.UINT8: "B",
    V.INT8: "b",
    V.UINT16: "H",
    V.INT16: "h",
    V.UINT32: "I",
    V.INT32: "i",
    V.FLOAT32: "f",
    V.BOOL: "?",
    V.UINT64: "Q",
    V.INT64: "q",
    V.FLOAT64: "d",
}


def _string(text: str | bytes, order: str) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(order + "Q", len(raw)) + raw


def _payload(value_type: GgufValueType, value: object, order: str) -> bytes:
    if value_type is V.STRING:
        assert isinstance(value, str | bytes)
        return _string(value, order)
    if value_type is V.ARRAY:
        assert isinstance(value, tuple)
        element_type, items = value
        body = b"".join(_payload(element_type, item, order) for item in items)
        return struct.pack(order + "IQ", element_type, len(items)) + body
    return struct.pack(order + _FORMATS[value_type], value)


def gguf_bytes(
    metadata: Sequence[tuple[str, Value]],
    tensors: Sequence[tuple[str, tuple[int, ...], int]] = (),
    *,
    order: str = "<",
    version: int = 3,
    alignment: int = 32,
) -> bytes:
    """A GGUF file as llama.cpp writes one: header, tensor infos, aligned zeroed tensor data."""
    out = bytearray(b"GGUF" + struct.pack(order + "IQQ", version, len(tensors), len(metadata)))
    for key, (value_type, value) in metadata:
        out += _string(key, order) + struct.pack(order + "I", value_type)
        out += _payload(value_type, value, order)
    offset = 0
    for name, shape, type_id in tensors:
        out += _string(name, order) + struct.pack(
            order + f"I{len(shape)}QIQ", len(shape), *shape, type_id, offset
        )
        ggml = GGML_TYPES.get(type_id, GGML_TYPES[0])
        count = 1
        for dim in shape:
            count *= dim
        size = count // ggml.block_size * ggml.type_size
        offset += -(-size // alignment) * alignment
    out += bytes(-len(out) % alignment) + bytes(offset)
    return bytes(out)


def _write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


EVERY_TYPE: list[tuple[str, Value]] = [
    ("general.architecture", (V.STRING, "llama")),
    ("general.name", (V.STRING, "hand made ünïcode")),
    ("general.file_type", (V.UINT32, 15)),
    ("llama.block_count", (V.UINT32, 2)),
    ("llama.context_length", (V.UINT64, 4096)),
    ("llama.embedding_length", (V.INT32, 256)),
    ("llama.attention.head_count", (V.ARRAY, (V.INT32, [4, 8]))),  # per layer: the largest
    ("llama.attention.head_count_kv", (V.UINT16, 2)),
    ("llama.attention.key_length", (V.UINT32, 64)),
    ("llama.attention.value_length", (V.UINT32, 32)),
    ("test.u8", (V.UINT8, 255)),
    ("test.i8", (V.INT8, -128)),
    ("test.i16", (V.INT16, -32768)),
    ("test.i64", (V.INT64, -(1 << 62))),
    ("test.f32", (V.FLOAT32, 0.5)),
    ("test.f64", (V.FLOAT64, -2.25)),
    ("test.bool", (V.BOOL, True)),
    ("test.u8s", (V.ARRAY, (V.UINT8, [0, 1, 255]))),
    ("test.i8s", (V.ARRAY, (V.INT8, [-1, 1]))),
    ("test.u16s", (V.ARRAY, (V.UINT16, [65535]))),
    ("test.i16s", (V.ARRAY, (V.INT16, [-2]))),
    ("test.u32s", (V.ARRAY, (V.UINT32, [7, 8]))),
    ("test.f32s", (V.ARRAY, (V.FLOAT32, [1.5, -0.25]))),
    ("test.bools", (V.ARRAY, (V.BOOL, [True, False]))),
    ("test.strings", (V.ARRAY, (V.STRING, ["a", "", "ß"]))),
    ("test.u64s", (V.ARRAY, (V.UINT64, [1 << 63]))),
    ("test.i64s", (V.ARRAY, (V.INT64, [-5]))),
    ("test.f64s", (V.ARRAY, (V.FLOAT64, [1e300]))),
    ("test.empty", (V.ARRAY, (V.UINT32, []))),
    ("tokenizer.chat_template", (V.STRING, "{{ messages }}")),
]
TENSORS = [
    ("token_embd.weight", (256, 100), 12),  # Q4_K: 256 weights in 144 bytes
    ("blk.0.attn_norm.weight", (256,), 0),  # F32
    ("blk.0.attn_q.weight", (256, 256), 8),  # Q8_0: 32 in 34
    ("output.weight", (256, 100), 1),  # F16
]
TENSOR_BYTES = 100 * 144 + 256 * 4 + 256 * 8 * 34 + 256 * 100 * 2


def test_every_value_type_and_the_summary(tmp_path: Path) -> None:
    info = read_gguf(_write(tmp_path, gguf_bytes(EVERY_TYPE, TENSORS)))
    meta = info.metadata
    assert (info.version, info.big_endian) == (3, False)
    assert meta["general.name"] == "hand made ünïcode"
    assert (meta["test.u8"], meta["test.i8"], meta["test.i16"]) == (255, -128, -32768)
    assert meta["test.i64"] == -(1 << 62)
    assert (meta["test.f32"], meta["test.f64"], meta["test.bool"]) == (0.5, -2.25, True)
    assert meta["test.u8s"] == GgufArray(V.UINT8, 3, (0, 1, 255))
    assert meta["test.i8s"] == GgufArray(V.INT8, 2, (-1, 1))
    assert meta["test.u16s"] == GgufArray(V.UINT16, 1, (65535,))
    assert meta["test.i16s"] == GgufArray(V.INT16, 1, (-2,))
    assert meta["test.u32s"] == GgufArray(V.UINT32, 2, (7, 8))
    assert meta["test.f32s"] == GgufArray(V.FLOAT32, 2, (1.5, -0.25))
    assert meta["test.bools"] == GgufArray(V.BOOL, 2, (True, False))
    assert meta["test.strings"] == GgufArray(V.STRING, 3, ("a", "", "ß"))
    assert meta["test.u64s"] == GgufArray(V.UINT64, 1, (1 << 63,))
    assert meta["test.i64s"] == GgufArray(V.INT64, 1, (-5,))
    assert meta["test.f64s"] == GgufArray(V.FLOAT64, 1, (1e300,))
    assert meta["test.empty"] == GgufArray(V.UINT32, 0, ())

    assert info.architecture == "llama"
    assert (info.block_count, info.context_length, info.embedding_length) == (2, 4096, 256)
    assert (info.head_count, info.head_count_kv) == (8, 2)
    assert (info.key_length, info.value_length) == (64, 32)
    assert (info.file_type, info.file_type_name, info.quantization) == (
        15,
        "MOSTLY_Q4_K_M",
        "Q4_K_M",
    )
    assert info.has_chat_template
    assert [t.name for t in info.tensors] == [name for name, _, _ in TENSORS]
    assert info.tensors[0].shape == (256, 100)
    assert info.tensors[0].ggml_type.name == "Q4_K"
    assert info.parameter_count == 256 * 100 * 2 + 256 + 256 * 256
    assert info.weight_bytes == TENSOR_BYTES
    assert info.data_offset % 32 == 0
    assert info.tensors[1].offset == -(-100 * 144 // 32) * 32


def test_a_big_endian_file_reads_the_same(tmp_path: Path) -> None:
    little = read_gguf(_write(tmp_path, gguf_bytes(EVERY_TYPE, TENSORS), "le.gguf"))
    big = read_gguf(_write(tmp_path, gguf_bytes(EVERY_TYPE, TENSORS, order=">"), "be.gguf"))
    assert big.big_endian
    assert big.metadata == little.metadata
    assert big.tensors == little.tensors
    assert big.weight_bytes == little.weight_bytes


def test_absent_fields_are_none(tmp_path: Path) -> None:
    info = read_gguf(_write(tmp_path, gguf_bytes([("general.architecture", (V.STRING, "qwen2"))])))
    assert info.architecture == "qwen2"
    assert (info.block_count, info.key_length) == (None, None)
    assert (info.file_type, info.quantization) == (None, None)
    assert not info.has_chat_template
    assert (info.parameter_count, info.weight_bytes, info.tensors) == (0, 0, ())


def test_a_long_array_is_stepped_over_and_what_follows_still_reads(tmp_path: Path) -> None:
    tokens = [f"t{i}" for i in range(KEEP_ARRAY_VALUES + 1)]
    scores = [0.0] * (KEEP_ARRAY_VALUES + 1)
    data = gguf_bytes(
        [
            ("tokenizer.ggml.tokens", (V.ARRAY, (V.STRING, tokens))),
            ("tokenizer.ggml.scores", (V.ARRAY, (V.FLOAT32, scores))),
            ("general.architecture", (V.STRING, "llama")),
        ],
        TENSORS[:1],
    )
    info = read_gguf(_write(tmp_path, data))
    assert info.metadata["tokenizer.ggml.tokens"] == GgufArray(V.STRING, len(tokens), None)
    assert info.metadata["tokenizer.ggml.scores"] == GgufArray(V.FLOAT32, len(scores), None)
    assert info.architecture == "llama"
    assert info.tensors[0].name == "token_embd.weight"


def test_every_truncation_of_the_header_and_data_is_refused(tmp_path: Path) -> None:
    data = gguf_bytes(EVERY_TYPE, TENSORS)
    path = tmp_path / "cut.gguf"
    for end in [*range(len(data) - TENSOR_BYTES + 1), len(data) - 1]:
        path.write_bytes(data[:end])
        with pytest.raises(GgufError):
            read_gguf(path)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"GGML" + bytes(20), "bad magic"),
        (b"\x7fELF" + bytes(60), "bad magic"),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1"),
        (b"GGUF" + struct.pack("<IQQ", 4, 0, 0), "version 4"),
    ],
)
def test_not_gguf_is_refused(tmp_path: Path, data: bytes, reason: str) -> None:
    with pytest.raises(GgufError, match=reason):
        read_gguf(_write(tmp_path, data))


def _header(tensors: int, kvs: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_header(0, 1) + struct.pack("<Q", 1 << 62) + bytes(64), "exceeds the limit"),
        (_header(0, 1) + struct.pack("<Q", 1 << 20) + bytes(64), "truncated"),
        (
            _header(0, 1) + _string("k", "<") + struct.pack("<IQ", V.STRING, 1 << 63) + b"x",
            "exceeds the limit",
        ),
        (
            _header(0, 1) + _string("k", "<") + struct.pack("<IIQ", V.ARRAY, V.UINT64, 1 << 40),
            "exceeds the limit",
        ),
        (
            _header(0, 1) + _string("k", "<") + struct.pack("<IIQ", V.ARRAY, V.STRING, 1 << 21),
            "cannot fit",
        ),
        (_header(1 << 60, 0), "exceeds the limit"),
        (_header(0, 1 << 60), "exceeds the limit"),
        (_header(1000, 0) + bytes(64), "cannot fit"),
    ],
    ids=[
        "key length",
        "key past end",
        "string length",
        "array length",
        "strings",
        "tensors",
        "kvs",
        "tensor fit",
    ],
)
def test_absurd_declared_sizes_fail_at_once(tmp_path: Path, data: bytes, reason: str) -> None:
    path = _write(tmp_path, data)
    started = time.monotonic()
    with pytest.raises(GgufError, match=reason):
        read_gguf(path)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    ("metadata", "tensors", "reason"),
    [
        ([("a", (V.UINT8, 1)), ("a", (V.UINT8, 2))], [], "duplicate metadata key"),
        ([("a", (V.ARRAY, (V.ARRAY, [])))], [], "array of arrays"),
        ([("general.alignment", (V.UINT32, 24))], [], "power of two"),
        (
            [("general.architecture", (V.STRING, "llama")), ("llama.block_count", (V.STRING, "2"))],
            [],
            "integer",
        ),
        ([("general.architecture", (V.UINT32, 1))], [], "must be a string"),
        ([], [("t", (32,), 99)], "unknown ggml type 99"),
        ([], [("t", (1, 1, 1, 1, 1), 0)], "5 dims"),
        ([], [("t", (40,), 8)], "not whole Q8_0 blocks"),
        ([], [("t", (32,), 0), ("t", (32,), 0)], "duplicate tensor names"),
        ([], [("x" * 64, (32,), 0)], "exceeds the limit of 63"),
    ],
)
def test_malformed_files_are_refused(
    tmp_path: Path,
    metadata: list[tuple[str, Value]],
    tensors: list[tuple[str, tuple[int, ...], int]],
    reason: str,
) -> None:
    with pytest.raises(GgufError, match=reason):
        read_gguf(_write(tmp_path, gguf_bytes(metadata, tensors)))


def test_an_unknown_value_type_is_refused(tmp_path: Path) -> None:
    data = _header(0, 1) + _string("k", "<") + struct.pack("<I", 13) + bytes(8)
    with pytest.raises(GgufError, match="unknown value type 13"):
        read_gguf(_write(tmp_path, data))


def test_a_tensor_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    data = gguf_bytes([], [("t", (64,), 0)])
    with pytest.raises(GgufError, match="ends past the end"):
        read_gguf(_write(tmp_path, data[:-1]))


def test_bits_per_weight_size_a_file_that_is_not_here() -> None:
    # llama.cpp's README: Llama-3.1-8B (8.03e9 parameters) is 4.58 GiB as Q4_K_M, 7.95 as Q8_0.
    gib = 1 << 30
    assert estimate_weight_bytes(8_030_000_000, "Q4_K_M") / gib == pytest.approx(4.58, abs=0.01)
    assert estimate_weight_bytes(8_030_000_000, "q8_0") / gib == pytest.approx(7.95, abs=0.01)
    assert estimate_weight_bytes(1_000_000, "F16") == 2_000_000
    with pytest.raises(KeyError):
        estimate_weight_bytes(1, "Q9_K")
    short = {name.removeprefix("MOSTLY_").removeprefix("ALL_") for name in FILE_TYPE_NAMES.values()}
    assert set(BITS_PER_WEIGHT) <= short


# -- the real thing --------------------------------------------------------------------------------


def test_the_tiny_gguf(llama_cpp_install: tuple[Path, Path]) -> None:
    _, gguf = llama_cpp_install
    info = read_gguf(gguf)
    # scripts/make_tiny_model.py: hidden 128, 2 layers, 2 heads (head_dim 64), 1 KV head,
    # vocab 512, 512 positions, intermediate 256, untied embeddings; converted as f32.
    assert info.architecture == "llama"
    assert (info.block_count, info.context_length, info.embedding_length) == (2, 512, 128)
    assert (info.head_count, info.head_count_kv) == (2, 1)
    assert (info.file_type, info.file_type_name, info.quantization) == (0, "ALL_F32", "F32")
    assert info.has_chat_template
    vocab, hidden, kv, ffn, layers = 512, 128, 64, 256, 2
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn + 2 * hidden
    assert info.parameter_count == 2 * vocab * hidden + layers * per_layer + hidden
    assert info.weight_bytes == 4 * info.parameter_count
    assert {t.ggml_type.name for t in info.tensors} == {"F32"}
    assert info.data_offset + info.weight_bytes <= gguf.stat().st_size


def _gguf_py(python: Path, script: str) -> object:
    """Run ``script`` with llama.cpp's own gguf-py (vendored in the sdist) and parse its JSON."""
    env = {**os.environ, "PYTHONPATH": str(gguf_py_dir(python))}
    proc = subprocess.run(
        [str(python), "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_tables_agree_with_llama_cpps_gguf_py(llama_cpp_install: tuple[Path, Path]) -> None:
    python, _ = llama_cpp_install
    theirs = _gguf_py(
        python,
        "import json, gguf\n"
        "print(json.dumps({'types': {int(t): [t.name, *gguf.GGML_QUANT_SIZES[t]]"
        " for t in gguf.GGMLQuantizationType},"
        " 'ftypes': {int(f): f.name for f in gguf.LlamaFileType if f.name != 'GUESSED'}}))",
    )
    assert isinstance(theirs, dict)
    ours_types = {str(k): [t.name, t.block_size, t.type_size] for k, t in GGML_TYPES.items()}
    assert ours_types == theirs["types"]
    assert {str(k): v for k, v in FILE_TYPE_NAMES.items()} == theirs["ftypes"]


def test_the_tiny_gguf_reads_as_gguf_py_reads_it(llama_cpp_install: tuple[Path, Path]) -> None:
    python, gguf = llama_cpp_install
    theirs = _gguf_py(
        python,
        "import json, sys, gguf\n"
        f"r = gguf.GGUFReader({str(gguf)!r})\n"
        "print(json.dumps({'data_offset': r.data_offset, 'keys': sorted(r.fields),"
        " 'tensors': [[t.name, [int(d) for d in t.shape], int(t.tensor_type),"
        " int(t.data_offset) - r.data_offset, int(t.n_elements), int(t.n_bytes)]"
        " for t in r.tensors]}))",
    )
    assert isinstance(theirs, dict)
    info = read_gguf(gguf)
    keys = [k for k in theirs["keys"] if not k.startswith("GGUF.")]  # gguf-py adds the header
    assert sorted(info.metadata) == keys
    assert info.data_offset == theirs["data_offset"]
    ours = [
        [t.name, list(t.shape), next(k for k, v in GGML_TYPES.items() if v == t.ggml_type),
         t.offset, t.element_count, t.byte_size]
        for t in info.tensors
    ]  # fmt: skip
    assert ours == theirs["tensors"]
