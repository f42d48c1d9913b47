"""The tokenizer of a GGUF file as an HF tokenizer.json and tokenizer_config.json."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .gguf_file import GGUFError


def write_tokenizer(meta: Mapping[str, object], out: Path) -> None:
    """A byte-level BPE tokenizer.json from the GGUF vocab and merges, plus the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    digits = meta.get("tokenizer.ggml.pre") in ("smollm", "qwen2", "llama-bpe")
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, types) if kind == 3]  # llama.cpp's CONTROL token type
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        i = meta.get(key)
        return None if i is None else tokens[int(i)]

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("tokenizer.ggml.bos_token_id"),
              "eos_token": token("tokenizer.ggml.eos_token_id"), "pad_token": token("tokenizer.ggml.padding_token_id"),
              "unk_token": token("tokenizer.ggml.unknown_token_id"),
              "chat_template": meta.get("tokenizer.chat_template"), "model_max_length": 8192}
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2))
