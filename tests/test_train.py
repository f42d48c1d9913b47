"""Training parity: 8 AdamW steps of shardwise on a TP x DP layout against HF trained in one process.

Fixed data (5 sequences per step, split unevenly over DP), fp32, the resident provider.
Every step's loss is within 1e-5 relative of HF's, and after the last step every weight
within 1e-4 of its tensor's max |w|, on every rank.
"""

from __future__ import annotations

import pytest
import train_workers as tw

from shardwise import launch

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1)]  # (dp, tp)
CONFIGS = ("qwen3-untied", "qwen2-tied", "mistral-untied", "llama-tied")  # q/k norms, 9/3 heads, odd vocab, ties


@pytest.fixture(scope="module")
def runs(checkpoints) -> dict[tuple[int, int], dict[str, dict]]:
    """Every config trained on every mesh, one launch per mesh."""
    out = {}
    for dp, tp in MESHES:
        paths = [str(checkpoints[name]) for name in CONFIGS]
        found = tw.train_all(paths, 1, 1) if dp * tp == 1 else launch(tw.train_all, dp * tp, paths, tp, dp,
                                                                          timeout=600)
        out[dp, tp] = dict(zip(CONFIGS, found))
    return out


@pytest.mark.parametrize("dp,tp", MESHES, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_training_matches_hf(runs, name, dp, tp):
    found = runs[dp, tp][name]
    for rank, out in found.items():
        assert out["loss"] <= 1e-5, f"{name} dp={dp} tp={tp} {rank}: losses {out['losses']} vs {out['expected']}"
        assert out["weights"] <= 1e-4, f"{name} dp={dp} tp={tp} {rank}: weight error {out['weights']}"
    losses = found["rank 0"]["losses"]
    assert losses[-1] < losses[0], f"the loss did not fall: {losses}"
