"""Turn a llama.cpp GGUF file into an HF-format checkpoint shardwise (and HF) can load.

Four things differ between the formats, and each gets one small function here:
tensor data (quantized blocks -> dequantized floats), tensor names, the Q/K row
order (llama.cpp interleaves rope pairs for the llama arch), and the metadata
(config.json and the tokenizer with its chat template). Needs the `hf` extra.

The file is hostile, so all of it is checked before anything is written: the
container by ``read_gguf``, each metadata value config.json takes (type and range,
named by its key) through ``Meta``, the tokenizer's by building it first, and each
tensor's type, name and shape against the spec of the generated config.json.
"""

from __future__ import annotations

import json
import logging
import math
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...plan.spec import DTYPES, ModelSpec, SpecError, TensorInfo, spec_from_config
from ...progress import progress_bar
from ...untrusted import is_int
from ..collective_write import write_checkpoint
from ..publish import check_target
from ..writer import save_safetensors
from .file import GGUFError, GGUFTensor, read_gguf
from .tokenizer import tokenizer_files

log = logging.getLogger("shardwise.gguf_import")  # the name its log lines have always carried

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
# GGUF architecture (also the HF model_type) -> HF model class.
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
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
# config.json token id -> GGUF key.
TOKEN_IDS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
             "pad_token_id": "tokenizer.ggml.padding_token_id"}
MAX_SIZE = 2**31 - 1  # no real model has a dimension this large; beyond it, int32 index math downstream overflows
REQUIRED = object()


def _show(value: object) -> str:
    """A metadata value for a message: its kind and a short repr (a vocabulary would fill the screen)."""
    kind = {bool: "bool", int: "integer", float: "float", str: "string", list: "array"}[type(value)]
    return f"{kind} {reprlib.repr(value)}"


@dataclass(frozen=True)
class Meta:
    """GGUF metadata read key by key with a type and range check, so a bad value fails naming its key."""

    path: Path
    values: dict[str, object]

    def fail(self, key: str, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: key {key!r}: {problem}")

    def get(self, key: str, ok: Callable[[object], bool], expected: str, default: object = REQUIRED):
        """The value of ``key`` if ``ok`` accepts it, else ``default`` if it is absent and there is one."""
        if key not in self.values:
            if default is REQUIRED:
                raise self.fail(key, f"missing; expected {expected}")
            return default
        value = self.values[key]
        if not ok(value):
            raise self.fail(key, f"expected {expected}, got {_show(value)}")
        return value

    def integer(self, key: str, default: object = REQUIRED, low: int = 1, high: int = MAX_SIZE, why: str = "") -> int:
        return self.get(key, lambda v: is_int(v) and low <= v <= high, f"an integer from {low} to {high}{why}",
                        default)

    def number(self, key: str, default: object = REQUIRED) -> float:
        """A positive finite number (an epsilon, a frequency, a factor): NaN or inf would poison every logit."""
        return float(self.get(key, lambda v: type(v) in (int, float) and 0 < v < math.inf,
                              "a positive finite number", default))

    def choice(self, key: str, choices: tuple[str, ...], default: object = REQUIRED) -> str:
        return self.get(key, lambda v: type(v) is str and v in choices, f"one of {', '.join(map(repr, choices))}",
                        default)


def hf_name(name: str) -> str | None:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}" if m and m.group(2) in LAYER_NAMES else None


def unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of rope pairs in Q/K rows, restoring HF's half-split order."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(t: GGUFTensor) -> np.ndarray:
    """Float32 data of one tensor in its HF shape; ``read_gguf`` checked the bytes fit that shape exactly."""
    from gguf import quants

    return np.array(quants.dequantize(t.data, t.type), dtype=np.float32).reshape(t.shape)


def build_tokenizer(path: Path, metadata: dict[str, object]) -> dict[str, str]:
    """The tokenizer files, built before the checkpoint is written: building them is where the vocabulary is
    vetted, and inside the checkpoint's write step a bad one would surface as a failed write, not a bad file."""
    try:
        return tokenizer_files(metadata)
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None


def hf_config(meta: Meta, n_tensors: int, tied: bool, dtype: str) -> dict:
    """config.json from the metadata, every value checked: a bad one builds a silently wrong model, or a spec too
    big to enumerate (hence the layer count's bound)."""
    arch = meta.choice("general.architecture", tuple(ARCHS))
    tokens = meta.get("tokenizer.ggml.tokens", lambda v: type(v) is list and len(v) > 0, "a non-empty array")
    n_tokens = len(tokens)  # the embedding rows, unless {arch}.vocab_size pads them; tokenizer_files checks the rest
    heads = meta.integer(f"{arch}.attention.head_count")
    hidden = meta.integer(f"{arch}.embedding_length")
    return {
        "architectures": [ARCHS[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": meta.integer(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.integer(f"{arch}.block_count", high=max(n_tensors, 1),
                                          why=f" (each layer has several tensors; the file has {n_tensors})"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads(meta, arch, heads),
        "head_dim": head_dim(meta, arch, hidden, heads),
        "max_position_embeddings": meta.integer(f"{arch}.context_length", 2048),
        "rms_norm_eps": meta.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "vocab_size": meta.integer(f"{arch}.vocab_size", n_tokens, low=n_tokens),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "dtype": dtype,
        **rope_config(meta, arch),
        **{name: meta.integer(key, None, 0, n_tokens - 1) for name, key in TOKEN_IDS.items()},
    }


def kv_heads(meta: Meta, arch: str, heads: int) -> int:
    """KV heads, shared by equal groups of query heads (GQA)."""
    key = f"{arch}.attention.head_count_kv"
    n = meta.integer(key, heads)
    if heads % n:
        raise meta.fail(key, f"expected a divisor of the {heads} query heads, got {n}")
    return n


def head_dim(meta: Meta, arch: str, hidden: int, heads: int) -> int:
    """Per-head width: explicit, or hidden / heads (which must then divide). Rope rotates pairs, so it is even,
    and rotates all of it: partial rotary embeddings are not supported."""
    key = f"{arch}.attention.key_length"
    if key not in meta.values and hidden % heads:
        raise meta.fail(f"{arch}.attention.head_count", f"expected a divisor of embedding_length {hidden} "
                                                        f"(there is no {key}), got {heads}")
    dim = meta.integer(key, hidden // heads)
    if dim % 2:
        raise meta.fail(key, f"expected an even head dim (rope rotates pairs), got {dim}")
    meta.get(f"{arch}.rope.dimension_count", lambda v: v == dim, f"{dim}, the head dim", None)
    return dim


def rope_config(meta: Meta, arch: str) -> dict:
    cfg: dict = {"rope_theta": meta.number(f"{arch}.rope.freq_base", 10000.0)}
    if meta.choice(f"{arch}.rope.scaling.type", ("none", "linear"), "none") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": meta.number(f"{arch}.rope.scaling.factor")}
    return cfg


def model_spec(path: Path, config: dict) -> ModelSpec:
    """The spec of the generated config.json: the shapes the tensors must have."""
    try:
        return spec_from_config(config)
    except SpecError as e:
        raise GGUFError(f"{path}: the metadata describes a model shardwise cannot represent: {e}") from None


def check_tensors(path: Path, tensors: list[GGUFTensor], spec: ModelSpec) -> dict[str, GGUFTensor]:
    """HF name -> GGUF tensor, for exactly the tensors the spec lists, each of a supported type and the right
    shape: checked before dequantizing, since Q/K unpermuting and HF loading both rely on the shapes."""
    expected = spec.tensors()
    found = {hf_tensor_name(path, t, expected): t for t in tensors}
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise GGUFError(f"{path}: the metadata implies tensors the file lacks: {', '.join(missing[:3])}{more}")
    return found


def hf_tensor_name(path: Path, t: GGUFTensor, expected: dict[str, TensorInfo]) -> str:
    """The HF name of a tensor the import can convert and the config expects, in the shape it expects."""
    if t.name == "rope_freqs.weight":
        raise GGUFError(f"{path}: tensor 'rope_freqs.weight' (llama3 rope factors) is not supported yet")
    if t.type.name not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {t.name!r} uses quantization {t.type.name}, "
                        f"which is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    name = hf_name(t.name)
    if name is None:
        raise GGUFError(f"{path}: tensor {t.name!r} has no HF counterpart")
    if name not in expected:
        raise GGUFError(f"{path}: tensor {t.name!r} ({name}) is not part of the model the metadata describes")
    if t.shape != expected[name].shape:
        raise GGUFError(f"{path}: tensor {t.name!r} has shape {list(t.shape)}, but the metadata implies "
                        f"{list(expected[name].shape)}")
    return name


def to_hf(t: GGUFTensor, config: dict, dtype: str) -> torch.Tensor:
    """One tensor as HF stores it: dequantized, and for llama Q/K, with rope pairs back in half-split order."""
    w = dequantize(t)
    if config["model_type"] == "llama" and ".attn_q." in t.name:
        w = unpermute_rope(w, config["num_attention_heads"])
    elif config["model_type"] == "llama" and ".attn_k." in t.name:
        w = unpermute_rope(w, config["num_key_value_heads"])
    return torch.from_numpy(w).to(DTYPES[dtype])


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write an HF checkpoint of ``gguf_path`` to ``out_dir`` (atomically: it appears complete or not at all).

    ``out_dir`` must be new, empty, or (with ``overwrite``) a checkpoint holding nothing else.
    """
    path, out = Path(gguf_path), Path(out_dir)
    check_target(out, overwrite, [path])
    if dtype not in DTYPES:
        raise GGUFError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    source = read_gguf(path)
    tied = all(t.name != "output.weight" for t in source.tensors)
    config = hf_config(Meta(path, source.metadata), len(source.tensors), tied, dtype)
    tokenizer = build_tokenizer(path, source.metadata)
    found = check_tensors(path, source.tensors, model_spec(path, config))
    tensors = {name: to_hf(t, config, dtype)
               for name, t in progress_bar(found.items(), desc="dequantizing", unit="tensor")}

    def write(tmp: Path) -> None:
        save_safetensors(tensors, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for name, data in tokenizer.items():
            (tmp / name).write_text(data)

    write_checkpoint(out, [("writing data", write)], overwrite=overwrite, sources=[path])
    log.info("imported %s -> %s (%d tensors)", path, out, len(tensors))
    return out
