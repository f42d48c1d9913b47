"""Every layout computes what HF transformers computes, for every architecture, tied or not."""

from __future__ import annotations

import pytest
import torch
from conftest import CHECKPOINTS, PROMPT, STEPS
from shared_launch import SharedLaunches, with_env
from workers import forward_and_generate, sample_on_every_rank

LAYOUTS = [(tp, pp) for pp in (1, 2) for tp in (1, 2, 3, 4)]
GLOO = ("qwen2-untied", "mistral-tied")  # run again at tp=3 x pp=2 with SHARDWISE_SHM=0


@pytest.fixture(scope="module")
def runs(checkpoints) -> SharedLaunches:
    """One launch per world size serves every layout of that size, all checkpoints and this module's other checks:
    spawning ranks is the slow part."""
    paths = {name: str(p) for name, p in checkpoints.items()}
    jobs = {("layout", tp, pp, name): (tp * pp, forward_and_generate, (tp, pp, {name: path}, PROMPT, STEPS))
            for tp, pp in LAYOUTS for name, path in paths.items()}
    gloo = {name: paths[name] for name in GLOO}
    jobs["gloo",] = (6, with_env, ({"SHARDWISE_SHM": "0"}, forward_and_generate, 3, 2, gloo, PROMPT, STEPS))
    jobs["sampling",] = (4, sample_on_every_rank, (paths["qwen3-tied"], PROMPT))
    return SharedLaunches(jobs, timeout=600, local=False)  # tp=pp=1 too in a launched rank


def run_layout(tp: int, pp: int, name: str, runs: SharedLaunches) -> tuple:
    return runs.result(("layout", tp, pp, name))[0][name]


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_matches_hf(tp, pp, name, runs, references):
    ref_logits, ref_tokens = references[name]
    logits, tokens = run_layout(tp, pp, name, runs)
    assert logits.shape == ref_logits.shape
    err = (logits - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    assert err <= 1e-4 * scale, f"{name} tp={tp} pp={pp}: max abs diff {err:.3g} vs max |logit| {scale:.3g}"
    assert torch.equal(tokens, ref_tokens), f"{name} tp={tp} pp={pp}: greedy tokens differ from HF"


def test_gloo_path_matches_shared_memory_path(runs, references):
    """The shared-memory all-reduce is an optimization: plain gloo (SHARDWISE_SHM=0 in the ranks) must give the same
    answers."""
    out = runs.result(("gloo",))[0]
    for name in GLOO:
        ref_logits, ref_tokens = references[name]
        logits, tokens = out[name]
        assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
        assert torch.equal(tokens, ref_tokens)


def test_sampling_is_identical_on_every_rank_and_stops_at_eos(checkpoints, runs):
    """Sampled tokens agree across TP and PP (same logits, same seed), and finished rows are padded with EOS."""
    per_rank = runs.result(("sampling",))[0]
    assert all(torch.equal(per_rank[0], other) for other in per_rank[1:])
    out = per_rank[0]
    new = out[0, PROMPT.shape[1]:].tolist()
    # Pretend that row 0's first sampled token not seen before (from the third on) ends its sequence.
    end = next((i for i in range(2, len(new) - 1) if new[i] not in new[:i]), None)
    if end is None:
        pytest.skip("row 0 sampled too few distinct tokens to place an EOS")
    eos, stop = new[end], PROMPT.shape[1] + end + 1
    from shardwise import load_model

    model = load_model(checkpoints["qwen3-tied"], progress=False)
    stopped = model.generate(PROMPT, 12, temperature=0.8, top_k=20, seed=7, eos_token_id=eos)
    assert torch.equal(stopped[0, :stop], out[0, :stop])
    assert (stopped[0, stop:] == eos).all(), "a finished row must be padded with EOS"
