"""Gradients through the TP runtime: each rank's local gradient is the matching boxes of HF's gradient.

The model runs under grad mode with its resident weights requiring a gradient, and the
loss is HF's next-token cross-entropy on the same ids. TP-sharded tensors and replicated
ones fed identical inputs (norms, biases of row-parallel layers) come out exact with no
reduction, because the TP collectives carry their backward; the regions the plan finds
partial (q/k norms, KV heads replicated over TP ranks) match once ``PartialGradReducer`` has
summed them, and do not before.
"""

from __future__ import annotations

import grad_workers as gw
import pytest
from conftest import CHECKPOINTS
from shared_launch import SharedLaunches

from shardwise import Layout, load_spec, plan_rank
from shardwise.train.grads import tp_partials

# (checkpoint, tp): every architecture at tp=2; tp=3 splitting 3 KV heads; tp=3 and 4 replicating 2 KV heads;
# OLMo-2's full-width k_norm at tp=4, where KV head 0 sits on two ranks, and Phi-3's packed qkv_proj at tp=3
CASES = ([(n, 1) for n in ("llama-tied", "qwen3-untied")] + [(name, 2) for name in CHECKPOINTS]
         + [(f"{a}-{t}", 3) for a in ("llama", "qwen2") for t in ("tied", "untied")]
         + [("mistral-untied", 3), ("mistral-tied", 4), ("qwen3-tied", 3), ("olmo2-untied", 4), ("phi3-untied", 3)])
UNREDUCED = [("qwen3-untied", 2), ("mistral-untied", 3)]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(checkpoints) -> SharedLaunches:
    """Every case's errors, one launch per TP degree; HF's gradient of each checkpoint is computed once, here."""
    jobs = {}
    for reduce, cases in ((True, CASES), (False, UNREDUCED)):
        for name, tp in cases:
            path = str(checkpoints[name])
            jobs[name, tp, reduce] = (tp, gw.tp_gradients, (path, tp, reduce, gw.hf_gradients(path)))
    return SharedLaunches(jobs, timeout=300)


def errors(runs: SharedLaunches, name: str, tp: int, reduce: bool = True) -> dict[str, float]:
    return runs.result((name, tp, reduce))[0]


@pytest.mark.parametrize("name,tp", CASES, ids=str)
def test_local_gradients_are_hf_gradient_boxes(runs, name, tp):
    found = errors(runs, name, tp)
    assert found, "no tensors compared"
    bad = {k: v for k, v in found.items() if not v <= TOLERANCE}
    assert not bad, f"{name} at tp={tp}: {bad}"


@pytest.mark.parametrize("name,tp", UNREDUCED, ids=str)
def test_without_the_reduction_exactly_the_partial_tensors_are_wrong(checkpoints, runs, name, tp):
    """The reduction is needed, and only where the plan says: unreduced, the tensors with a partial region are
    the ones off HF's gradient."""
    path = checkpoints[name]
    spec, layout = load_spec(path), Layout(tp=tp)
    partial = {f"rank {r} {p.name}" for r in range(tp) for p in tp_partials(plan_rank(spec, layout, r))}
    wrong = {k for k, v in errors(runs, name, tp, reduce=False).items() if not v <= TOLERANCE}
    assert partial and wrong == partial


def test_partials_follow_the_head_placement(checkpoints):
    """Mistral's 2 KV heads over 3 TP ranks: KV head 0 sits on ranks 0-1, head 1 on rank 2 alone, so only ranks 0
    and 1 share k/v rows, and nothing else of theirs is partial (q heads are split, norms act on the hidden state).
    Qwen3's q/k norms are shared by every TP rank."""
    spec = load_spec(checkpoints["mistral-untied"])
    found = {r: tp_partials(plan_rank(spec, Layout(tp=3), r)) for r in range(3)}
    d = spec.head_dim
    assert found[2] == ()
    for r in (0, 1):
        n_q = plan_rank(spec, Layout(tp=3), r).heads.n_q * d
        assert {(p.name, p.index[0].start, p.index[0].stop, p.ranks) for p in found[r]} == {
            (f"layers.{n}.qkv", lo, lo + d, (0, 1)) for n in range(spec.layers) for lo in (n_q, n_q + d)}
    spec = load_spec(checkpoints["qwen3-tied"])
    names = {(p.name, p.ranks) for p in tp_partials(plan_rank(spec, Layout(tp=2), 1))}
    assert names == {(f"layers.{n}.{k}", (0, 1)) for n in range(spec.layers) for k in ("q_norm", "k_norm")}
