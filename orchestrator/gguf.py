"""What a GGUF file (llama.cpp's model format) holds, read from its header without the tensors.

The layout (GGUF v2/v3, little- or big-endian; v1 is long obsolete and refused):
magic ``GGUF``, version u32, tensor count u64, metadata count u64, the metadata key/values
(key string, value type u32, value), the tensor infos (name string, n_dims u32, dims u64 each,
ggml type u32, data offset u64), then the tensor data, aligned to ``general.alignment`` (32).
A string is a u64 length and UTF-8 bytes; an array an element type u32, a length u64, elements.

Only the header is read. Every count and length the file declares is checked against a bound
and against the bytes the file has left before anything is allocated, so a hostile or broken
file fails with a ``GgufError`` at once instead of exhausting memory. The limits mirror
llama.cpp's own loader (ggml/src/gguf.cpp): no nested arrays, at most 4 dims, known ggml types,
rows a whole number of blocks, tensors inside the file.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO, TypeAlias

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Bounds on what a file may declare (real files stay far below: a 256k-token vocabulary, a few
# thousand tensors, chat templates of tens of KiB).
MAX_KEY_VALUES = 1 << 16
MAX_TENSORS = 1 << 20
MAX_ARRAY_LENGTH = 1 << 22
MAX_STRING_BYTES = 1 << 26
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME - 1
MAX_DIMS = 4  # GGML_MAX_DIMS
# Arrays longer than this (the vocabulary, its scores and merges) are skipped, not kept.
KEEP_ARRAY_VALUES = 4096


class GgufError(ValueError):
    """The file is not a GGUF file this reader accepts (with the reason)."""


class GgufValueType(enum.IntEnum):
    """A metadata value's type code."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_FORMATS = {
    GgufValueType.UINT8: "B",
    GgufValueType.INT8: "b",
    GgufValueType.UINT16: "H",
    GgufValueType.INT16: "h",
    GgufValueType.UINT32: "I",
    GgufValueType.INT32: "i",
    GgufValueType.FLOAT32: "f",
    GgufValueType.BOOL: "B",
    GgufValueType.UINT64: "Q",
    GgufValueType.INT64: "q",
    GgufValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class GgmlType:
    """A tensor data type: ``type_size`` bytes hold ``block_size`` weights."""

    name: str
    block_size: int
    type_size: int


_QK_K = 256
# ggml's types by id, as gguf-py's GGML_QUANT_SIZES gives them (llama-cpp-python 0.3.36).
GGML_TYPES: Mapping[int, GgmlType] = {
    type_id: GgmlType(name, block, size)
    for type_id, name, block, size in (
        (0, "F32", 1, 4),
        (1, "F16", 1, 2),
        (2, "Q4_0", 32, 2 + 16),
        (3, "Q4_1", 32, 2 + 2 + 16),
        (6, "Q5_0", 32, 2 + 4 + 16),
        (7, "Q5_1", 32, 2 + 2 + 4 + 16),
        (8, "Q8_0", 32, 2 + 32),
        (9, "Q8_1", 32, 2 + 2 + 32),
        (10, "Q2_K", _QK_K, 2 + 2 + _QK_K // 16 + _QK_K // 4),
        (11, "Q3_K", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + 12),
        (12, "Q4_K", _QK_K, 2 + 2 + _QK_K // 2 + 12),
        (13, "Q5_K", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
        (14, "Q6_K", _QK_K, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
        (15, "Q8_K", _QK_K, 4 + _QK_K + _QK_K // 8),
        (16, "IQ2_XXS", _QK_K, 2 + _QK_K // 4),
        (17, "IQ2_XS", _QK_K, 2 + _QK_K // 4 + _QK_K // 32),
        (18, "IQ3_XXS", _QK_K, 2 + _QK_K // 4 + _QK_K // 8),
        (19, "IQ1_S", _QK_K, 2 + _QK_K // 8 + _QK_K // 16),
        (20, "IQ4_NL", 32, 2 + 16),
        (21, "IQ3_S", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
        (22, "IQ2_S", _QK_K, 2 + _QK_K // 4 + _QK_K // 16),
        (23, "IQ4_XS", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 64),
        (24, "I8", 1, 1),
        (25, "I16", 1, 2),
        (26, "I32", 1, 4),
        (27, "I64", 1, 8),
        (28, "F64", 1, 8),
        (29, "IQ1_M", _QK_K, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
        (30, "BF16", 1, 2),
        (34, "TQ1_0", _QK_K, 2 + 4 * 13),
        (35, "TQ2_0", _QK_K, 2 + 64),
        (39, "MXFP4", 32, 1 + 16),
        (40, "NVFP4", 64, 4 + 32),
        (41, "Q1_0", 128, 2 + 16),
        (42, "Q2_0", 64, 2 + 16),
    )
}

# llama.cpp's LLAMA_FTYPE values (``general.file_type``): what most weights were quantized to.
FILE_TYPE_NAMES: Mapping[int, str] = {
    0: "ALL_F32",
    1: "MOSTLY_F16",
    2: "MOSTLY_Q4_0",
    3: "MOSTLY_Q4_1",
    7: "MOSTLY_Q8_0",
    8: "MOSTLY_Q5_0",
    9: "MOSTLY_Q5_1",
    10: "MOSTLY_Q2_K",
    11: "MOSTLY_Q3_K_S",
    12: "MOSTLY_Q3_K_M",
    13: "MOSTLY_Q3_K_L",
    14: "MOSTLY_Q4_K_S",
    15: "MOSTLY_Q4_K_M",
    16: "MOSTLY_Q5_K_S",
    17: "MOSTLY_Q5_K_M",
    18: "MOSTLY_Q6_K",
    19: "MOSTLY_IQ2_XXS",
    20: "MOSTLY_IQ2_XS",
    21: "MOSTLY_Q2_K_S",
    22: "MOSTLY_IQ3_XS",
    23: "MOSTLY_IQ3_XXS",
    24: "MOSTLY_IQ1_S",
    25: "MOSTLY_IQ4_NL",
    26: "MOSTLY_IQ3_S",
    27: "MOSTLY_IQ3_M",
    28: "MOSTLY_IQ2_S",
    29: "MOSTLY_IQ2_M",
    30: "MOSTLY_IQ4_XS",
    31: "MOSTLY_IQ1_M",
    32: "MOSTLY_BF16",
    36: "MOSTLY_TQ1_0",
    37: "MOSTLY_TQ2_0",
    38: "MOSTLY_MXFP4_MOE",
    39: "MOSTLY_NVFP4",
    40: "MOSTLY_Q1_0",
    41: "MOSTLY_Q2_0",
}

# Bits per weight of a whole file by its quantization (the name llama-quantize and file names
# use), for sizing a file that is not here. Measured on Llama-3.1-8B in llama.cpp's
# tools/quantize/README.md (embeddings and output kept at higher precision are included);
# F32/F16/BF16 and the legacy Q4_0..Q5_1 are their nominal block rates.
BITS_PER_WEIGHT: Mapping[str, float] = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5008,
    "Q6_K": 6.5633,
    "Q5_K_M": 5.7036,
    "Q5_K_S": 5.5704,
    "Q5_1": 6.0,
    "Q5_0": 5.5,
    "Q4_K_M": 4.8944,
    "Q4_K_S": 4.6672,
    "Q4_1": 5.0,
    "Q4_0": 4.5,
    "IQ4_NL": 4.6818,
    "IQ4_XS": 4.4597,
    "Q3_K_L": 4.2979,
    "Q3_K_M": 3.9960,
    "Q3_K_S": 3.6429,
    "IQ3_M": 3.7628,
    "IQ3_S": 3.6606,
    "IQ3_XS": 3.4977,
    "IQ3_XXS": 3.2548,
    "Q2_K": 3.1593,
    "Q2_K_S": 2.9697,
    "IQ2_M": 2.9294,
    "IQ2_S": 2.7403,
    "IQ2_XS": 2.5882,
    "IQ2_XXS": 2.3824,
    "IQ1_M": 2.1460,
    "IQ1_S": 2.0042,
}

GgufScalar: TypeAlias = int | float | bool | str


@dataclass(frozen=True)
class GgufArray:
    """An array value; ``values`` is None when it was longer than KEEP_ARRAY_VALUES (skipped)."""

    element_type: GgufValueType
    length: int
    values: tuple[GgufScalar, ...] | None


GgufValue: TypeAlias = GgufScalar | GgufArray


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's info: its shape as stored (innermost dim first) and where its data lies."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GgmlType
    offset: int  # from the start of the data section

    @property
    def element_count(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def byte_size(self) -> int:
        return self.element_count // self.ggml_type.block_size * self.ggml_type.type_size


@dataclass(frozen=True)
class GgufInfo:
    """A GGUF file's header: its metadata, its tensors, and the facts a VRAM planner needs."""

    version: int
    big_endian: bool
    metadata: Mapping[str, GgufValue]
    tensors: tuple[GgufTensor, ...]
    data_offset: int  # where the (aligned) tensor data starts in the file
    architecture: str | None
    block_count: int | None
    context_length: int | None
    embedding_length: int | None
    head_count: int | None  # the largest, where the file gives one per layer
    head_count_kv: int | None
    key_length: int | None
    value_length: int | None
    file_type: int | None
    file_type_name: str | None  # llama.cpp's LLAMA_FTYPE name, e.g. MOSTLY_Q4_K_M
    parameter_count: int
    weight_bytes: int
    has_chat_template: bool

    @property
    def quantization(self) -> str | None:
        """The file type as llama-quantize names it (``Q4_K_M``, ``F16``), a BITS_PER_WEIGHT key."""
        if self.file_type_name is None:
            return None
        return self.file_type_name.removeprefix("MOSTLY_").removeprefix("ALL_")


def estimate_weight_bytes(parameter_count: int, quantization: str) -> int:
    """Bytes of weights of a model of ``parameter_count`` parameters quantized as ``quantization``
    (a BITS_PER_WEIGHT key such as ``Q4_K_M``); raises KeyError for an unknown one."""
    return round(parameter_count * BITS_PER_WEIGHT[quantization.upper()] / 8)


def read_gguf(path: str | os.PathLike[str]) -> GgufInfo:
    """Read a GGUF file's header (never its tensor data); raises GgufError if it is not one."""
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        return _read(_Reader(stream, size))


class _Reader:
    """Bounded little- or big-endian reads that never ask for more bytes than the file has left."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self.stream = stream
        self.size = size
        self.position = 0
        self.order = "<"

    def bytes(self, count: int, what: str) -> bytes:
        if count > self.size - self.position:
            raise GgufError(
                f"truncated: {what} needs {count} bytes at offset {self.position}, "
                f"the file has {self.size - self.position} left"
            )
        data = self.stream.read(count)
        if len(data) != count:
            raise GgufError(f"truncated: short read of {what} at offset {self.position}")
        self.position += count
        return data

    def skip(self, count: int) -> None:
        if count > self.size - self.position:
            raise GgufError(f"truncated: {count} bytes to skip at offset {self.position}")
        self.stream.seek(count, os.SEEK_CUR)
        self.position += count

    def unpack(self, fmt: str, what: str) -> tuple[int | float, ...]:
        layout = struct.Struct(self.order + fmt)
        return layout.unpack(self.bytes(layout.size, what))

    def u32(self, what: str) -> int:
        return int(self.unpack("I", what)[0])

    def u64(self, what: str) -> int:
        return int(self.unpack("Q", what)[0])

    def count(self, what: str, limit: int, min_item_bytes: int) -> int:
        value = self.u64(what)
        if value > limit:
            raise GgufError(f"{what} {value} exceeds the limit of {limit}")
        if value * min_item_bytes > self.size - self.position:
            raise GgufError(f"truncated: {value} {what} cannot fit in the rest of the file")
        return value

    def string(self, what: str, limit: int = MAX_STRING_BYTES, *, strict: bool = False) -> str:
        length = self.count(f"{what} length", limit, 1)
        raw = self.bytes(length, what)
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError as exc:
            raise GgufError(f"{what} at offset {self.position - length} is not UTF-8") from exc

    def value_type(self, what: str) -> GgufValueType:
        code = self.u32(what)
        try:
            return GgufValueType(code)
        except ValueError:
            raise GgufError(f"{what} has unknown value type {code}") from None


def _read(reader: _Reader) -> GgufInfo:
    if reader.bytes(4, "magic") != MAGIC:
        raise GgufError("not a GGUF file (bad magic)")
    raw_version = reader.bytes(4, "version")
    version = int.from_bytes(raw_version, "little")
    if (
        version not in SUPPORTED_VERSIONS
        and int.from_bytes(raw_version, "big") in SUPPORTED_VERSIONS
    ):
        reader.order = ">"
        version = int.from_bytes(raw_version, "big")
    if version not in SUPPORTED_VERSIONS:
        raise GgufError(f"unsupported GGUF version {version} (this reader knows 2 and 3)")
    # Each tensor info takes at least 8+1+4+8+4+8 bytes, each key/value 8+1+4+1.
    tensor_count = reader.count("tensors", MAX_TENSORS, 33)
    kv_count = reader.count("metadata entries", MAX_KEY_VALUES, 14)

    metadata: dict[str, GgufValue] = {}
    for _ in range(kv_count):
        key = reader.string("metadata key", strict=True)
        if key in metadata:
            raise GgufError(f"duplicate metadata key {key!r}")
        metadata[key] = _read_value(reader, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GgufError(f"general.alignment must be a power of two, not {alignment!r}")

    tensors = [_read_tensor(reader, index) for index in range(tensor_count)]
    names = {t.name for t in tensors}
    if len(names) != len(tensors):
        raise GgufError("duplicate tensor names")
    data_offset = -(-reader.position // alignment) * alignment
    data_size = reader.size - data_offset
    for tensor in tensors:
        if tensor.offset % alignment:
            raise GgufError(f"tensor {tensor.name!r} offset {tensor.offset} is not aligned")
        if tensor.offset + tensor.byte_size > data_size:
            raise GgufError(f"truncated: tensor {tensor.name!r} ends past the end of the file")
    return _summarise(reader, metadata, tuple(tensors), version, data_offset)


def _read_value(reader: _Reader, key: str) -> GgufValue:
    value_type = reader.value_type(f"value of {key!r}")
    if value_type is not GgufValueType.ARRAY:
        return _read_scalar(reader, value_type, key)
    element_type = reader.value_type(f"elements of {key!r}")
    if element_type is GgufValueType.ARRAY:
        raise GgufError(f"{key!r} is an array of arrays (llama.cpp refuses them too)")
    min_bytes = 8 if element_type is GgufValueType.STRING else _scalar_size(element_type)
    length = reader.count(f"elements of {key!r}", MAX_ARRAY_LENGTH, min_bytes)
    if length > KEEP_ARRAY_VALUES:
        # The vocabulary and its kin: stepped over without making an object per element.
        if element_type is GgufValueType.STRING:
            for _ in range(length):
                reader.skip(reader.count(f"element of {key!r} length", MAX_STRING_BYTES, 1))
        else:
            reader.skip(length * min_bytes)
        return GgufArray(element_type, length, None)
    if element_type is GgufValueType.STRING:
        values: tuple[GgufScalar, ...] = tuple(
            reader.string(f"element of {key!r}") for _ in range(length)
        )
    else:
        fmt = _SCALAR_FORMATS[element_type]
        values = reader.unpack(f"{length}{fmt}", f"elements of {key!r}")
        if element_type is GgufValueType.BOOL:
            values = tuple(bool(item) for item in values)
    return GgufArray(element_type, length, values)


def _read_scalar(reader: _Reader, value_type: GgufValueType, key: str) -> GgufScalar:
    if value_type is GgufValueType.STRING:
        return reader.string(f"value of {key!r}")
    value = reader.unpack(_SCALAR_FORMATS[value_type], f"value of {key!r}")[0]
    return bool(value) if value_type is GgufValueType.BOOL else value


def _scalar_size(value_type: GgufValueType) -> int:
    return struct.calcsize("<" + _SCALAR_FORMATS[value_type])


def _read_tensor(reader: _Reader, index: int) -> GgufTensor:
    name = reader.string(f"name of tensor {index}", MAX_TENSOR_NAME_BYTES, strict=True)
    n_dims = reader.u32(f"dims of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GgufError(f"tensor {name!r} has {n_dims} dims (1 to {MAX_DIMS} allowed)")
    shape = tuple(int(dim) for dim in reader.unpack(f"{n_dims}Q", f"shape of {name!r}"))
    type_id = reader.u32(f"type of {name!r}")
    ggml_type = GGML_TYPES.get(type_id)
    if ggml_type is None:
        raise GgufError(f"tensor {name!r} has unknown ggml type {type_id}")
    if shape[0] % ggml_type.block_size:
        raise GgufError(
            f"tensor {name!r}: rows of {shape[0]} are not whole {ggml_type.name} blocks "
            f"of {ggml_type.block_size}"
        )
    offset = reader.u64(f"offset of {name!r}")
    tensor = GgufTensor(name, shape, ggml_type, offset)
    if tensor.element_count >= 1 << 63:
        raise GgufError(f"tensor {name!r} has an absurd shape {shape}")
    return tensor


def _summarise(
    reader: _Reader,
    metadata: dict[str, GgufValue],
    tensors: tuple[GgufTensor, ...],
    version: int,
    data_offset: int,
) -> GgufInfo:
    architecture = metadata.get("general.architecture")
    if architecture is not None and not isinstance(architecture, str):
        raise GgufError(f"general.architecture must be a string, not {architecture!r}")
    prefix = f"{architecture}." if architecture else None

    def number(key: str) -> int | None:
        if prefix is None:
            return None
        return _int_field(metadata, prefix + key)

    file_type = _int_field(metadata, "general.file_type")
    return GgufInfo(
        version=version,
        big_endian=reader.order == ">",
        metadata=metadata,
        tensors=tensors,
        data_offset=data_offset,
        architecture=architecture,
        block_count=number("block_count"),
        context_length=number("context_length"),
        embedding_length=number("embedding_length"),
        head_count=number("attention.head_count"),
        head_count_kv=number("attention.head_count_kv"),
        key_length=number("attention.key_length"),
        value_length=number("attention.value_length"),
        file_type=file_type,
        file_type_name=None if file_type is None else FILE_TYPE_NAMES.get(file_type),
        parameter_count=sum(t.element_count for t in tensors),
        weight_bytes=sum(t.byte_size for t in tensors),
        has_chat_template=isinstance(metadata.get("tokenizer.chat_template"), str),
    )


def _int_field(metadata: Mapping[str, GgufValue], key: str) -> int | None:
    """An integer field, or the largest of a per-layer array of them; None when absent."""
    value = metadata.get(key)
    if value is None:
        return None
    items: tuple[GgufValue, ...] = (value,)
    if isinstance(value, GgufArray) and value.values:
        items = value.values
    ints = [item for item in items if isinstance(item, int) and not isinstance(item, bool)]
    if len(ints) != len(items):
        raise GgufError(f"{key} must be an integer, not {value!r}")
    return max(ints)
