"""Functions the mixture-of-experts tests run inside spawned ranks."""

from __future__ import annotations

import torch

from shardwise import Layout, load_model


def moe_outputs(layout: Layout, provider: str, checkpoints: dict[str, str], ids: torch.Tensor, steps: int) -> dict:
    """Logits and greedy tokens of every checkpoint under one layout and provider."""
    out = {}
    for name, path in checkpoints.items():
        with load_model(path, layout, progress=False, provider=provider) as model:
            out[name] = (model(ids), model.generate(ids, steps))
    return out


def export_under(layout: Layout, provider: str, checkpoints: dict[str, str], outs: dict[str, str]) -> None:
    """Load each checkpoint in its own dtypes under ``layout`` and export it: every rank writes its own experts."""
    from shardwise import export, load_weights

    for name, path in checkpoints.items():
        export(load_weights(path, layout, progress=False, provider=provider), outs[name])
