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


def layout_from_world(pp: int) -> Layout:
    return Layout.from_world(pp=pp)


def load_only(path: str, tp: int, pp: int) -> int:
    return len(load_model(path, Layout(tp, pp), progress=False).weights.tensors)


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



def reshard_all(srcs: dict[str, str], dsts: dict[str, str], tp: int, pp: int) -> None:
    """Load each source (HF or sharded) under tp x pp in its own dtypes, and save it sharded."""
    from shardwise import load_weights, save_sharded

    for name, src in srcs.items():
        save_sharded(load_weights(src, Layout(tp, pp), progress=False), dsts[name])


def export_all(srcs: dict[str, str], outs: dict[str, str], tp: int, pp: int) -> None:
    from shardwise import export, load_weights

    for name, src in srcs.items():
        export(load_weights(src, Layout(tp, pp), progress=False), outs[name], max_file_bytes=20_000)


def export_model(src: str, out: str, tp: int, pp: int) -> None:
    """Export straight from a running fp32 model, whatever the checkpoint's dtype was."""
    from shardwise import export

    export(load_model(src, Layout(tp, pp), progress=False), out)


def export_and_die(src: str, out: str, tp: int, dying_rank: int) -> None:
    """An export during which one rank is killed after writing its first box."""
    import torch.distributed as dist

    import shardwise.hf_export as ex
    from shardwise import export, load_weights

    write = ex._write_box

    def write_then_die(*args):
        write(*args)
        if dist.get_rank() == dying_rank:
            os._exit(9)

    ex._write_box = write_then_die
    export(load_weights(src, Layout(tp, 1), progress=False), out, max_file_bytes=20_000)


def sample_on_every_rank(path: str, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each rank's sampled continuation under TP=2 x PP=2, gathered so the test can compare them."""
    import torch.distributed as dist

    out = load_model(path, Layout(2, 2), progress=False).generate(ids, 12, temperature=0.8, top_k=20, seed=7)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    return every
