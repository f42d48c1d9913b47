"""Ownership is per element: over every rank of a layout, ``RankPlan.owned()`` covers each checkpoint element once.

ZeRO-3 cuts each TP rank's flat block at its own chunk edges, so a KV head replicated over
TP ranks lands in boxes that overlap without being equal; a tied embedding sits on the
first and the last stage; a series spreads layers over DP ranks. Whatever the config and
layout, the union of the owned boxes must be the model, with no element twice.
"""

from __future__ import annotations

import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwise import Box, Layout, plan_rank
from shardwise.plan.mesh import LayoutError
from shardwise.plan.series import Series
from shardwise.plan.spec import spec_from_config

EXAMPLES = int(os.environ.get("SHARDWISE_FUZZ_EXAMPLES", "150"))


@st.composite
def models(draw) -> dict:
    kv = draw(st.integers(1, 4))
    heads = kv * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 3, 5]))
    arch = draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"]))
    return {"model_type": arch, "hidden_size": draw(st.integers(3, 13)), "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": head_dim, "num_hidden_layers": draw(st.integers(2, 5)),
            "intermediate_size": draw(st.integers(4, 23)), "vocab_size": draw(st.integers(5, 29)),
            "tie_word_embeddings": draw(st.booleans()), "attention_bias": draw(st.booleans())}


def coverage(spec, layout: Layout, provider: str, series: tuple[Series, ...]) -> dict[str, torch.Tensor]:
    """How many ranks own each element of each checkpoint tensor, with each owned box checked against what its
    rank holds (an owned box must lie inside the held tensor it names, at the offset of those elements) and each
    element's owner checked to be the lowest rank holding it (found here by walking every rank's plan)."""
    counts = {name: torch.zeros(info.shape, dtype=torch.int32) for name, info in spec.tensors().items()}
    owner = {name: torch.full(info.shape, -1, dtype=torch.int32) for name, info in spec.tensors().items()}
    lowest = {name: torch.full(info.shape, -1, dtype=torch.int32) for name, info in spec.tensors().items()}
    for rank in range(layout.world_size):
        plan = plan_rank(spec, layout, rank, provider, series)
        for t in plan.tensors.values():
            for box in t.boxes:
                region = lowest[box.source][box.source_index()]
                region[region < 0] = rank
        for name, box in plan.owned():
            held = [b for b in plan.tensors[name].boxes if b.source == box.source]
            assert any(b.intersect(box.start, box.stop) == box for b in held), (rank, name, box)
            counts[box.source][box.source_index()] += 1
            owner[box.source][box.source_index()] = rank
    for name in counts:
        assert torch.equal(owner[name], lowest[name]), f"{name}: an element is owned by a rank other than the lowest"
    return counts


@settings(max_examples=EXAMPLES, deadline=None, derandomize="SHARDWISE_FUZZ_EXAMPLES" not in os.environ)
@given(models(), st.integers(1, 4), st.integers(1, 2), st.integers(1, 4),
       st.sampled_from(["resident", "zero3", "series"]))
def test_owned_covers_every_element_once(config, tp, pp, dp, provider):
    if provider == "series" and dp < 2:
        provider = "zero3"
    if provider == "series":  # a series needs two of its layers on every stage
        config = config | {"num_hidden_layers": max(config["num_hidden_layers"], 2 * pp)}
    spec = spec_from_config(config)
    series = (Series("*.o", prefetch=0),) if provider == "series" else ()
    try:
        plan_rank(spec, Layout(tp, pp, dp), 0, provider, series)
    except LayoutError:  # more TP ranks than heads, or stages than layers: refused, nothing to own
        return
    for name, c in coverage(spec, Layout(tp, pp, dp), provider, series).items():
        assert int(c.min()) == 1 and int(c.max()) == 1, (
            f"{name}: elements owned {int(c.min())}..{int(c.max())} times at tp={tp} pp={pp} dp={dp} {provider}")


def test_overlapping_zero3_chunks_of_a_replicated_kv_head_are_owned_once():
    """2 heads / 1 KV head at tp 2 dp 3, Mistral-style 6/2 heads at tp 4 dp 4, a tied embedding at pp 2, each under
    ZeRO-3; and a mixture of experts at EP 2 (its EP peers hold all but the routed experts alike) under each
    provider."""
    base = {"model_type": "llama", "num_hidden_layers": 2, "intermediate_size": 20, "vocab_size": 17}
    moe = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "hidden_size": 8, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 12, "moe_intermediate_size": 6,
           "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 17, "tie_word_embeddings": True}
    cases = [(base | {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1}, Layout(2, 1, 3), "zero3"),
             (base | {"hidden_size": 24, "num_attention_heads": 6, "num_key_value_heads": 2}, Layout(4, 1, 4),
              "zero3"),
             (base | {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
                      "tie_word_embeddings": True}, Layout(1, 2, 2), "zero3")]
    cases += [(moe, Layout(2, 2, 2, ep=2), provider) for provider in ("resident", "zero3", "series")]
    for config, layout, provider in cases:
        series = (Series("*.o", prefetch=0),) if provider == "series" else ()
        for name, c in coverage(spec_from_config(config), layout, provider, series).items():
            assert int(c.max()) == 1 and int(c.min()) == 1, f"{name} at {layout} {provider}"


def test_box_minus_leaves_exactly_the_outside():
    box = Box("w", (2, 1), (9, 7), (0, 3))
    parts = box.minus((4, 0), (6, 5))
    grid = torch.zeros(12, 12, dtype=torch.int32)
    for p in parts:
        assert p.intersect(p.start, p.stop) == p and box.intersect(p.start, p.stop) == p  # placed where it lands
        grid[p.source_index()] += 1
    want = torch.zeros(12, 12, dtype=torch.int32)
    want[2:9, 1:7] = 1
    want[4:6, 1:5] = 0
    assert torch.equal(grid, want)
    assert box.minus((20, 20), (30, 30)) == [box]
    assert box.minus((0, 0), (12, 12)) == []


def test_bench_plan_times_one_rank_from_a_config(tmp_path, capsys):
    """``shardwise bench plan CONFIG --json`` plans the last rank from a config alone, under each provider, and
    reports what that rank's plan finds (its owned boxes, its reduction groups)."""
    import json

    from shardwise.cli import main
    from shardwise.train.grads import partials, reduction_groups, stage_partials

    config = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
              "num_hidden_layers": 4, "intermediate_size": 12, "vocab_size": 17, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    main(["bench", "plan", str(tmp_path / "config.json"), "--tp", "2", "--pp", "2", "--dp", "3", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["provider"] for r in rows] == ["resident", "zero3"]
    spec, layout = spec_from_config(config), Layout(2, 2, 3)
    for row in rows:
        plan = plan_rank(spec, layout, 11, row["provider"])
        assert (row["world"], row["rank"]) == (12, 11)
        assert row["owned_boxes"] == len(plan.owned())
        assert row["reduction_groups"] == sum(len(reduction_groups(plan, f)) for f in (partials, stage_partials)) > 0
        assert all(row[f"{k}_s"] >= 0 for k in ("plan", "owned", "groups", "memory"))


def test_reduction_groups_are_every_ranks_sets():
    """The sets of ranks partial gradients are summed over, found from replica 0 and repeated per replica, are the
    sets every rank of the world finds (tied embedding over stages, TP, EP)."""
    from shardwise.train.grads import partials, reduction_groups, stage_partials

    dense = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
             "num_hidden_layers": 4, "intermediate_size": 12, "vocab_size": 17, "tie_word_embeddings": True}
    moe = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 12, "moe_intermediate_size": 6,
           "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 17}
    for config, layout in ((dense, Layout(2, 2, 3)), (moe, Layout(2, 1, 2, ep=2))):
        spec = spec_from_config(config)
        for provider in ("resident", "zero3"):
            plan = plan_rank(spec, layout, 0, provider)
            for find in (partials, stage_partials):
                walked = sorted({p.ranks for r in range(layout.world_size) for p in find(plan.peer(r))})
                assert reduction_groups(plan, find) == walked, (layout, provider, find.__name__)
