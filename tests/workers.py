"""Functions the tests run inside spawned ranks; kept light so that ranks start fast."""

from __future__ import annotations

import os

import torch

from shardwise import Layout, load_model


def forward_and_generate(tp: int, pp: int, checkpoints: dict[str, str], ids: torch.Tensor, steps: int) -> dict:
    """Logits and greedy tokens of every checkpoint under one layout."""
    out = {}
    for name, path in checkpoints.items():
        model = load_model(path, Layout(tp, pp), progress=False)
        out[name] = (model(ids), model.generate(ids, steps))
    return out


def load_only(path: str, tp: int, pp: int) -> int:
    return len(load_model(path, Layout(tp, pp), progress=False).weights)


def fail_on_rank(rank: int, how: str) -> None:
    """Make one rank fail in a given way while the others wait for it in a collective."""
    import torch.distributed as dist

    if dist.get_rank() == rank:
        if how == "raise":
            raise ValueError(f"boom on rank {rank}")
        if how == "die":
            os._exit(3)
        if how == "stall":
            import time

            time.sleep(3600)
    dist.barrier()
