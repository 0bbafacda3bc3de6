"""Build a tiny random-weight Llama (about 2 MB) that real vLLM on CPU can serve.

Run it with the vLLM venv's interpreter (it needs torch, transformers and tokenizers):

    ~/.cache/vllm-chat-gateway/vllm-venv/bin/python scripts/make_tiny_model.py [OUT_DIR]

OUT_DIR defaults to ``$VCG_TINY_MODEL_DIR`` or
``${XDG_CACHE_HOME:-~/.cache}/vllm-chat-gateway/tiny-llama``. Nothing is downloaded: the tokenizer
is a 512-token byte-level BPE trained here on built-in text, the weights are random with a fixed
seed. The generated text is noise; tests must assert on shapes, counts and usage only.

Idempotent: if OUT_DIR already holds config.json and a tokenizer, it does nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

VOCAB_SIZE = 512
SEED = 1234
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD, "<|system|>", "<|user|>", "<|assistant|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you.",
    "A gateway forwards chat completion requests to a model server and streams tokens back.",
    "Users, quotas, conversations and API keys are stored in a database.",
    "Once upon a time there was a tiny language model that knew only five hundred tokens.",
    "def add(a, b):\n    return a + b\n",
    '{"role": "user", "content": "What is the capital of France?"}',
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" # $ % & @ ^ _ ` | ~",
    "system user assistant tool function message content stream usage tokens",
]


def default_dir() -> Path:
    env = os.environ.get("VCG_TINY_MODEL_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vllm-chat-gateway" / "tiny-llama"


def is_complete(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    vocab = tok.get_vocab_size()
    if vocab > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {vocab} tokens, more than {VOCAB_SIZE}")

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=512,
    )
    hf_tok.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64; head_dim 16 fails in vLLM's CPU attention
        num_key_value_heads=1,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=512,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.eval()

    # Write into a temp dir next to OUT and rename, so a crash never leaves a half model.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str]) -> int:
    out = Path(argv[1]).expanduser() if len(argv) > 1 else default_dir()
    if is_complete(out):
        print(f"tiny model already present: {out}")
        return 0
    start = time.monotonic()
    build(out)
    print(f"tiny model written to {out} in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
