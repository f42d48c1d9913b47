"""Rank-side half of tests/test_train.py: shardwise training against HF + torch.optim.AdamW in one process."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import VOCAB

from shardwise import Layout, load_model
from shardwise.plan.boxes import split_evenly
from shardwise.train.optim import AdamW
from shardwise.train.step import Trainer

STEPS, BATCH, SEQ = 8, 5, 9  # 5 sequences: uneven over dp 2 and 3
# eps 1e-6, not 1e-8: Adam divides by sqrt(v), so an element whose gradient is ~1e-8 (a few in each tiny model)
# would take a full lr step steered by summation-order rounding; both sides use the same hyperparameters.
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
# A key bias adds q.b to every score of a query, which the softmax cancels: its gradient is zero in exact
# arithmetic, so on both sides Adam normalizes rounding noise into full-size steps. It is left out of the
# weight comparison (its gradient is covered by tests/test_grad.py).
NOISE_ONLY = ".self_attn.k_proj.bias"


def batch(step: int) -> torch.Tensor:
    """The step's sequences: the same fixed data each step (so the loss falls), as the issue's parity asks."""
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100))


Expected = tuple[list[float], list[float], dict[str, torch.Tensor]]


@functools.cache
def hf_run(path: str, clip: float | None) -> Expected:
    """HF's model trained in this one process: its losses and gradient norms, and its weights after the last step.
    The tests compute it once per checkpoint in their own process and hand it to the ranks, which then never
    import transformers."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), **HYPER)
    balance = getattr(model.config, "output_router_logits", False)  # a mixture of experts' balancing loss
    losses, norms = [], []
    for step in range(STEPS):
        ids = batch(step)
        out = model(ids, output_router_logits=True) if balance else model(ids)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        if balance:
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))))
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    weights = {name: p.detach() for name, p in model.named_parameters()}
    if hasattr(model.config, "num_experts_per_tok"):  # experts fused in memory: their checkpoint names, as saved
        weights = _as_saved(model)
    if model.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return losses, norms, weights


def _as_saved(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the names transformers writes (per expert), by writing them."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return {k: v for f in Path(tmp).glob("*.safetensors") for k, v in load_file(f).items()}


def train_all(paths: list[str], tp: int, dp: int, provider: str = "resident", clip: float | None = None,
              micro: int = 1, expected: list[Expected] | None = None, tp_plan: dict | None = None, ep: int = 1
              ) -> list[dict[str, object]]:
    """``train`` for each checkpoint in one launch (spawning ranks is the slow part)."""
    return [train(path, tp, dp, provider, clip, micro, expected and expected[i], tp_plan, ep)
            for i, path in enumerate(paths)]


def train_under_plans(paths: list[str], tp: int, dp: int, provider: str, plans: dict[str, dict],
                      expected: list[Expected] | None = None) -> dict:
    """``train_all`` under each named TP plan, in one launch."""
    return {plan: train_all(paths, tp, dp, provider, expected=expected, tp_plan=tp_plan)
            for plan, tp_plan in plans.items()}


def train(path: str, tp: int, dp: int, provider: str = "resident", clip: float | None = None,
          micro: int = 1, expected: Expected | None = None, tp_plan: dict | None = None, ep: int = 1, pp: int = 1,
          sp: bool = False) -> dict[str, object]:
    """Every step's loss and gradient-norm relative error against HF (``expected``, from ``hf_run(path, clip)``,
    computed here if not given), and each rank's largest weight error relative to max |w|; each DP rank's sequences
    are cut into ``micro`` micro-batches (gradient accumulation)."""
    expected_losses, expected_norms, expected = expected or hf_run(path, clip)
    with load_model(path, Layout(tp=tp, dp=dp, ep=ep, pp=pp, sp=sp), dtype=torch.float32, progress=False,
                    provider=provider, tp_plan=tp_plan) as model:
        trainer = Trainer(model, AdamW(model.provider, **HYPER), max_grad_norm=clip)
        lo, hi = split_evenly(BATCH, dp)[model.plan.dp_rank]
        cuts = split_evenly(hi - lo, micro)
        results, tied = [], set()
        for step in range(STEPS):
            results.append(trainer.step([batch(step)[lo:hi][a:b] for a, b in cuts], BATCH * (SEQ - 1)))
            tied.add(_tied_copy(model))
        losses, norms = [r.loss for r in results], [r.grad_norm for r in results]
        trainer.close()
        worst, worst_at = 0.0, None
        for name, sharded in model.plan.tensors.items():
            got = model.weights.tensors[name].detach()
            for box in (b for b in sharded.boxes if not b.source.endswith(NOISE_ONLY)):
                want, scale = expected[box.source][box.source_index()], expected[box.source].abs().max()
                error = float((got[box.local_index()] - want).abs().max() / scale)
                if error > worst:
                    worst, worst_at = error, box.source
    out = {"loss": max(abs(a - b) / abs(b) for a, b in zip(losses, expected_losses)), "weights": worst,
           "worst_at": worst_at,
           "norm": max(abs(a - b) / abs(b) for a, b in zip(norms, expected_norms)), "clipped": norms[0] > (clip or 1e9),
           "losses": losses, "expected": expected_losses, "norms": norms,
           "tied": None if len(tied) != len(results) or None in tied else tuple(sorted(tied)),
           "tied_at": model.plan.layout.position(model.plan.rank)[1:]}
    if not dist.is_initialized():
        return {"rank 0": out}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, out)
    return {f"rank {r}": o for r, o in enumerate(everyone)}


def _tied_copy(model) -> str | None:
    """A digest of this rank's copy of a tied embedding (the first stage's embedding or the last stage's head), else
    None: the ranks holding the two copies compare them after every step."""
    import hashlib

    plan = model.plan
    if not plan.spec.tied or plan.layout.pp == 1 or not (plan.is_first or plan.is_last):
        return None
    name = "embed" if plan.is_first else "lm_head"
    name = next(n for n in model.weights.tensors if n.kind == name)
    return hashlib.sha256(model.weights.tensors[name].detach().numpy().tobytes()).hexdigest()


def die_while_saving(checkpoint: str, stream, saves: list[str]) -> None:
    """Save a training checkpoint twice (to each of ``saves``), train on, then die on rank 1 mid-way through
    overwriting the first: what it held must survive byte for byte (the test compares it with the second)."""
    import os

    import shardwise.io.sharded as sharded
    from shardwise.train.state import save_training

    model = load_model(checkpoint, Layout(dp=2), dtype=torch.float32, progress=False)
    optimizer = AdamW(model.provider, **HYPER)
    trainer = Trainer(model, optimizer)
    trainer.step(stream.micro_batches(1, model.plan.dp_rank, 2), stream.predicted())
    for out in saves:
        save_training(model, optimizer, out, stream)
    trainer.step(stream.micro_batches(2, model.plan.dp_rank, 2), stream.predicted())
    if dist.get_rank() == 1:
        def half_then_die(tensors, path):
            path.write_bytes(b"half a rank file")
            os._exit(9)
        sharded.save_safetensors = half_then_die
    save_training(model, optimizer, saves[0], stream, overwrite=True)


def train_keeping_every_save(job):
    """``train_rank``, each save going to a directory of its own, ``<save>-<step>``, instead of over the last."""
    import shardwise.train.run as run
    from shardwise.train.state import save_training

    def keep(model, optimizer, out, stream, overwrite=False, settings=None, dtype=None, sources=None):
        return save_training(model, optimizer, f"{out}-{optimizer.steps}", stream, settings=settings, dtype=dtype,
                             sources=sources)

    run.save_training = keep
    try:
        return run.train_rank(job)
    finally:  # the next job of a shared launch saves as usual
        run.save_training = save_training


def zero3_losses_by_work_dtype(checkpoint: str, work_dtypes: list) -> list[list[float]]:
    """4 zero3 steps at dp 2 from the same fp32 masters for each work dtype (None: the masters' own)."""
    out = []
    for work_dtype in work_dtypes:
        with load_model(checkpoint, Layout(dp=2), dtype=torch.float32, provider="zero3", work_dtype=work_dtype,
                        progress=False) as model:
            trainer = Trainer(model, AdamW(model.provider, **HYPER), max_grad_norm=1.0)
            out.append([trainer.step([batch(0)[dist.get_rank()::2]], BATCH * (SEQ - 1)).loss for _ in range(4)])
            trainer.close()
    return out


def step_memory(path: str, settings: list[tuple]) -> list[list[dict[str, int]]]:
    """For each setting (tp, dp, provider, work dtype name, prefetch, offload): one Trainer step, then every rank's
    ``Trainer.nbytes()``."""
    out = []
    for tp, dp, provider, work, prefetch, offload in settings:
        with load_model(path, Layout(tp=tp, dp=dp), dtype=torch.float32, progress=False, provider=provider,
                        work_dtype=work and getattr(torch, work), prefetch=prefetch, offload=offload) as model:
            trainer = Trainer(model, AdamW(model.provider, **HYPER))
            lo, hi = split_evenly(BATCH, dp)[model.plan.dp_rank]
            trainer.step([batch(0)[lo:hi]], BATCH * (SEQ - 1))
            nbytes = trainer.nbytes()
            trainer.close()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, nbytes)
        out.append(everyone)
    return out
