"""Functions the mixture-of-experts tests run inside spawned ranks."""

from __future__ import annotations

import torch

from shardwise import Layout, Series, load_model

EXPERT_SERIES = (Series("*.experts_down", prefetch=0), Series("*.experts_gate_up", prefetch=0))
"""The series provider's declarations here: each sparse layer's experts stored by one DP rank (Qwen3-MoE's dense
layer has none, so its series span the two sparse layers, and k is 0)."""


def moe_outputs(layout: Layout, provider: str, checkpoints: dict[str, str], ids: torch.Tensor, steps: int) -> dict:
    """Logits and greedy tokens of every checkpoint under one layout and provider (``EXPERT_SERIES`` for
    ``series``)."""
    out = {}
    series = EXPERT_SERIES if provider == "series" else ()
    for name, path in checkpoints.items():
        with load_model(path, layout, progress=False, provider=provider, series=series) as model:
            out[name] = (model(ids), model.generate(ids, steps))
    return out


def export_under(layout: Layout, provider: str, checkpoints: dict[str, str], outs: dict[str, str]) -> None:
    """Load each checkpoint in its own dtypes under ``layout`` and export it: every rank writes its own experts."""
    from shardwise import export, load_weights

    for name, path in checkpoints.items():
        export(load_weights(path, layout, progress=False, provider=provider), outs[name])


def train_in_two_runs(path: str, save: str, layout: Layout, expected, first: int) -> dict:
    """Half of a training run in two: with ``first`` 0, the first half of the steps from the HF checkpoint under
    ``layout``, saved as a training checkpoint at ``save``; with ``first`` the step to go on from, the rest, loaded
    from ``save`` under this ``layout`` with AdamW's state restored. Returns the losses of its steps, and after the
    second half the largest weight error against HF's final weights (``expected``), relative to each tensor's max
    |w|."""
    import torch.distributed as dist
    from train_workers import BATCH, HYPER, SEQ, STEPS, batch

    from shardwise.train.data import TokenStream
    from shardwise.train.optim import AdamW
    from shardwise.train.state import restore, save_training
    from shardwise.train.step import Trainer

    source = path if first == 0 else save
    with load_model(source, layout, dtype=torch.float32, progress=False) as model:
        optimizer = AdamW(model.provider, **HYPER)
        if first:
            restore(save, model, optimizer)
        trainer = Trainer(model, optimizer)
        steps = range(first, STEPS // 2 if first == 0 else STEPS)
        losses = [trainer.step([batch(step)], BATCH * (SEQ - 1)).loss for step in steps]
        trainer.close()
        if first == 0:
            stream = TokenStream.from_ids(list(range(BATCH * SEQ)), SEQ, BATCH, 0)
            save_training(model, optimizer, save, stream)
        worst = 0.0
        for name, sharded in model.plan.tensors.items():
            got = model.weights.tensors[name].detach()
            for box in sharded.boxes:
                want, scale = expected[2][box.source][box.source_index()], expected[2][box.source].abs().max()
                worst = max(worst, float((got[box.local_index()] - want).abs().max() / scale))
    if dist.is_initialized():
        every = torch.tensor([worst])
        dist.all_reduce(every, op=dist.ReduceOp.MAX)
        worst = float(every)
    return {"losses": losses, "weights": worst}
