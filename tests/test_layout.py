"""Layouts as data: every checkpoint element is owned, heads stay with their KV groups, splits are balanced."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, hf_config
from safetensors.torch import save_file

from shardwise import Box, Checkpoint, Layout, plan_rank
from shardwise.plan.boxes import split_evenly
from shardwise.plan.mesh import head_split
from shardwise.plan.spec import spec_from_config


@pytest.mark.parametrize("n,parts", [(10, 3), (131, 4), (3, 3), (7, 1)])
def test_split_evenly_is_balanced_and_contiguous(n, parts):
    ranges = split_evenly(n, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("heads,kv", [(9, 3), (8, 2), (16, 8), (32, 32), (12, 1)])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 5, 8])
def test_heads_stay_with_their_kv_group(heads, kv, tp):
    if tp > heads:
        pytest.skip("refused elsewhere")
    split = head_split(heads, kv, tp)
    group = heads // kv
    owned = [h for part in split for h in range(*part.q)]
    assert owned == list(range(heads)), "each query head exactly once, in order"
    for part in split:
        assert part.n_q >= 1
        assert all(part.kv[0] <= h // group < part.kv[1] for h in range(*part.q)), "q head away from its KV head"
        assert part.n_q % part.n_kv == 0, "uniform local GQA groups"
        if tp > kv:
            assert part.n_kv == 1, "KV heads replicated, one per rank"


def _coverage(spec, layout):
    counts = {name: torch.zeros(info.shape, dtype=torch.int32) for name, info in spec.tensors().items()}
    for rank in range(layout.world_size):
        seen = set()
        for t in plan_rank(spec, layout, rank).tensors.values():
            for box in t.boxes:
                if box not in seen:
                    seen.add(box)
                    counts[box.source][box.source_index()] += 1
    return counts


def _sharable(spec, tp: int) -> dict[str, torch.Tensor]:
    """Per checkpoint tensor, the elements several ranks may hold, from the architecture's table: a kind TP keeps
    whole (norm gains, a row-parallel bias), and the KV rows of a (packed) projection when TP outnumbers the KV
    heads. Everything else, the q rows of a packed qkv_proj included, must have one holder."""
    masks = {name: torch.zeros(info.shape, dtype=torch.bool) for name, info in spec.tensors().items()}
    for kind in (k for k in spec.table.kinds() if spec.holds(k)):
        axis = 1 if kind.style == "rowwise" else 0
        for part in kind.parts:
            whole = kind.style not in ("colwise", "rowwise", "embedding_rowwise") or part.unit is None
            if not (whole or part.unit == "kv" and tp > spec.kv_heads):
                continue
            lo = sum(spec.size(s) for s in part.at)
            index = [slice(None)] * len(part.shape)
            index[axis] = slice(lo, lo + spec.size(part.unit)) if part.unit else slice(None)
            for n in range(spec.layers) if "{n}" in part.source else (0,):
                masks[spec.source_of(part, n)][tuple(index)] = True
    return masks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (3, 2), (4, 2)])
def test_every_element_is_owned(arch, tied, tp, pp):
    spec = spec_from_config(hf_config(arch, tied).to_dict())
    counts = _coverage(spec, Layout(tp, pp))
    sharable = _sharable(spec, tp)
    for name, c in counts.items():
        assert int(c.min()) >= 1, f"{name}: some element has no owner"
        tied_twice = tied and name == "model.embed_tokens.weight" and pp > 1
        if not tied_twice and (~sharable[name]).any():
            held = int(c[~sharable[name]].max())
            assert held == 1, f"{name}: some element TP splits is held by {held} ranks"


def test_box_intersect():
    box = Box("w", (4, 0), (10, 8), (2, 0))
    assert box.intersect((0, 0), (6, 8)) == Box("w", (4, 0), (6, 8), (2, 0))
    assert box.intersect((6, 2), (20, 5)) == Box("w", (6, 2), (10, 5), (4, 2))
    assert box.intersect((10, 0), (12, 8)) is None


def test_reader_reads_strided_and_cast_boxes(tmp_path):
    w = torch.randn(6, 10).to(torch.float16)
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    ck = Checkpoint(tmp_path)
    dst = torch.zeros(5, 4, dtype=torch.float32)
    ck.read(Box("w", (1, 3), (5, 7), (1, 0)), dst)  # columns: a strided box
    assert torch.equal(dst[1:5], w[1:5, 3:7].float())
    rows = torch.zeros(2, 10, dtype=torch.bfloat16)
    ck.read(Box("w", (3, 0), (5, 10), (0, 0)), rows)  # whole rows, cast on the way
    assert torch.equal(rows, w[3:5].to(torch.bfloat16))
    ck.close()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_the_architecture_table_names_every_checkpoint_tensor(arch, tied, bias):
    """The tensors the table says a checkpoint holds are exactly those HF's model saves, with their shapes."""
    import transformers

    config = hf_config(arch, tied)
    config.attention_bias = config.mlp_bias = bias
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    saved = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if tied:
        saved.pop("lm_head.weight")
    spec = spec_from_config(config.to_dict())
    assert {name: info.shape for name, info in spec.tensors().items()} == saved
