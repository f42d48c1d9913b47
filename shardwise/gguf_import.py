"""Turn a llama.cpp GGUF file into an HF-format checkpoint shardwise (and HF) can load.

Four things differ between the formats, and each gets one small function here:
tensor data (quantized blocks -> dequantized floats), tensor names, the Q/K row
order (llama.cpp interleaves rope pairs for the llama arch), and the metadata
(config.json and the tokenizer with its chat template). Needs the `hf` extra.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .gguf_file import GGUFError
from .gguf_tokenizer import write_tokenizer
from .spec import DTYPES
from .writer import atomic_directory, save_safetensors

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in LAYER_NAMES:
        raise GGUFError(f"tensor {name!r} has no HF counterpart")
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"


def unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of rope pairs in Q/K rows, restoring HF's half-split order."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor, path: Path) -> np.ndarray:
    """Float32 data of one GGUF tensor, in row-major HF shape (GGUF lists dims innermost first)."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {tensor.name!r} uses quantization {kind}, "
                        f"which is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    try:
        data = quants.dequantize(tensor.data, tensor.tensor_type)
        return np.array(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
    except Exception as e:  # noqa: BLE001 - any failure here is a malformed tensor; say which
        raise GGUFError(f"{path}: tensor {tensor.name!r} ({kind}, shape {list(tensor.shape)}) "
                        f"could not be dequantized: {e}") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config(reader, arch: str, tied: bool, dtype: str, vocab: int) -> dict:
    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    cfg = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": ARCHS[arch],
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "dtype": dtype,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    scaling = meta("rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise GGUFError(f"rope scaling {scaling!r} is not supported")
    return cfg


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write an HF checkpoint of ``gguf_path`` to ``out_dir`` (atomically: it appears complete or not at all)."""
    from gguf import GGUFReader

    path, out = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise GGUFError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the gguf package raises many types for a bad file
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from e
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor", leave=False):
        if t.name == "rope_freqs.weight":
            raise GGUFError(f"{path}: tensor 'rope_freqs.weight' (llama3 rope factors) is not supported yet")
        w = dequantize(t, path)
        if arch == "llama" and ".attn_q." in t.name:
            w = unpermute_rope(w, heads)
        elif arch == "llama" and ".attn_k." in t.name:
            w = unpermute_rope(w, kv_heads)
        tensors[hf_name(t.name)] = torch.from_numpy(w).to(DTYPES[dtype])
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    config = hf_config(reader, arch, "output.weight" not in names, dtype, vocab)
    with atomic_directory(out) as tmp:
        save_safetensors(tensors, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        write_tokenizer({k: f.contents() for k, f in reader.fields.items()}, tmp)
    log.info("imported %s -> %s (%d tensors)", path, out, len(tensors))
    return out
