"""Initialisation is a function of (seed, tensor name, global index): any box, on any layout, gets the same values."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import hf_config

from shardwise import Layout, plan_rank
from shardwise.model.init import INIT_STD, fill_boxes, init_values
from shardwise.plan.boxes import Box, full_box, rows
from shardwise.plan.spec import ModelSpec, spec_from_config

SEED = 1234

# The 349M Llama: statistics are checked on its real tensor shapes.
LLAMA_349M = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                  num_attention_heads=16, vocab_size=32000)
RESIDUAL_STD = INIT_STD / math.sqrt(2 * 24)


def _spec(arch: str, tied: bool = False) -> ModelSpec:
    return spec_from_config(hf_config(arch, tied).to_dict())


def _full(spec: ModelSpec, name: str, seed: int = SEED, zero_residual: bool = False) -> torch.Tensor:
    return init_values(spec, full_box(name, spec.tensors()[name].shape), seed, zero_residual)


def _random_box(rng: random.Random, name: str, shape: tuple[int, ...]) -> Box:
    """A random non-empty sub-box, sometimes a single row or a column slice."""
    start, stop = [], []
    for n in shape:
        lo = rng.randrange(n)
        hi = lo + 1 if rng.random() < 0.3 else rng.randrange(lo + 1, n + 1)
        start.append(lo)
        stop.append(hi)
    return Box(name, tuple(start), tuple(stop), (0,) * len(shape))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "olmo2"])
def test_any_box_equals_the_slice_of_the_full_tensor(arch):
    spec = _spec(arch)
    rng = random.Random(arch)
    for name, info in spec.tensors().items():
        if ".layers.2." in name:  # three layers alike: one skipped keeps the test quick
            continue
        full = _full(spec, name)
        boxes = [_random_box(rng, name, info.shape) for _ in range(4)]
        if len(info.shape) == 2:
            rows_, cols_ = info.shape
            boxes += [rows(name, info.shape, rows_ - 1, rows_),  # the last row alone
                      Box(name, (0, cols_ // 3), (rows_, cols_ // 2), (0, 0))]  # a column slice
        for box in boxes:
            assert torch.equal(init_values(spec, box, SEED), full[box.source_index()]), f"{name} {box}"


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (3, 2), (4, 1)])
def test_every_layout_builds_the_same_model(tp, pp):
    spec = _spec("qwen2")
    full = {name: _full(spec, name) for name in spec.tensors()}
    layout = Layout(tp, pp)
    for rank in range(layout.world_size):
        for t in plan_rank(spec, layout, rank).tensors.values():
            dst = torch.full(t.shape, float("nan"))
            fill_boxes(dst, t.boxes, spec, SEED)
            for box in t.boxes:
                assert torch.equal(dst[box.local_index()], full[box.source][box.source_index()]), (rank, t.name)


@pytest.fixture(scope="module")
def big() -> ModelSpec:
    return spec_from_config(LLAMA_349M)


@pytest.mark.parametrize("name,std", [
    ("model.embed_tokens.weight", INIT_STD),
    ("lm_head.weight", INIT_STD),
    ("model.layers.5.self_attn.q_proj.weight", INIT_STD),
    ("model.layers.5.mlp.gate_proj.weight", INIT_STD),
    ("model.layers.5.self_attn.o_proj.weight", RESIDUAL_STD),
    ("model.layers.5.mlp.down_proj.weight", RESIDUAL_STD),
])
def test_matrices_are_normal_with_megatron_std(big, name, std):
    w = _full(big, name)
    assert w.shape == big.tensors()[name].shape and w.dtype == torch.float32
    assert abs(w.std().item() / std - 1) < 0.02
    assert abs(w.mean().item()) < 0.01 * std


@pytest.mark.parametrize("name", ["model.layers.5.self_attn.o_proj.weight", "model.layers.23.mlp.down_proj.weight"])
def test_zero_residual_zeroes_residual_projections_only(big, name):
    assert torch.count_nonzero(_full(big, name, zero_residual=True)) == 0
    assert _full(big, "model.layers.5.mlp.up_proj.weight", zero_residual=True).std().item() > 0.019


def test_norms_are_one_and_biases_zero():
    for arch in ("qwen2", "qwen3"):  # qwen2: q/k/v biases; qwen3: q/k norms
        spec = _spec(arch)
        for name, info in spec.tensors().items():
            if len(info.shape) == 1:
                expected = 0.0 if name.endswith(".bias") else 1.0
                assert torch.equal(_full(spec, name), torch.full(info.shape, expected)), name
    assert any(name.endswith("q_norm.weight") for name in _spec("qwen3").tensors())
    assert any(name.endswith("q_proj.bias") for name in _spec("qwen2").tensors())


def test_seed_and_name_decide_the_values():
    spec = _spec("llama", tied=False)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(_full(spec, q), _full(spec, q))
    assert not torch.equal(_full(spec, q), _full(spec, q, seed=SEED + 1))
    others = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.0.mlp.gate_proj.weight"]
    first_row = _full(spec, q)[0]
    for other in others:
        assert not torch.equal(first_row, _full(spec, other)[0]), other
    w = _full(spec, q)
    assert not torch.equal(w[0], w[1]), "rows must not repeat"
    assert not torch.equal(_full(spec, "model.embed_tokens.weight"), _full(spec, "lm_head.weight"))


def test_fill_boxes_places_fused_pieces_in_bf16():
    spec = _spec("llama")
    p = "model.layers.1.self_attn"
    q_shape, k_shape = spec.tensors()[f"{p}.q_proj.weight"].shape, spec.tensors()[f"{p}.k_proj.weight"].shape
    # q rows 8:24 then k rows 0:8, stacked as a fused qkv piece is.
    boxes = [rows(f"{p}.q_proj.weight", q_shape, 8, 24, at=0), rows(f"{p}.k_proj.weight", k_shape, 0, 8, at=16)]
    dst = torch.full((24, spec.hidden), float("nan"), dtype=torch.bfloat16)
    fill_boxes(dst, boxes, spec, SEED)
    assert torch.equal(dst[:16], _full(spec, f"{p}.q_proj.weight")[8:24].to(torch.bfloat16))
    assert torch.equal(dst[16:], _full(spec, f"{p}.k_proj.weight")[0:8].to(torch.bfloat16))


def test_boxes_outside_the_tensor_are_refused():
    spec = _spec("llama")
    name = "model.layers.0.mlp.down_proj.weight"
    rows_, cols_ = spec.tensors()[name].shape
    with pytest.raises(ValueError, match="outside"):
        init_values(spec, Box(name, (0, 0), (rows_ + 1, cols_), (0, 0)), SEED)
    with pytest.raises(ValueError, match="not a tensor"):
        init_values(spec, full_box("model.layers.9.mlp.down_proj.weight", (rows_, cols_)), SEED)
