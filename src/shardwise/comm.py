"""The process groups of a layout and the few collectives the runtime needs.

Every collective degrades to a no-op on a single rank, so the model code never
branches on whether it runs distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .layout import Layout
from .shm import ShmAllReduce, attach


@dataclass
class Comm:
    layout: Layout
    rank: int
    tp_group: dist.ProcessGroup | None
    shm: ShmAllReduce | None = None
    groups: list[dist.ProcessGroup] = field(default_factory=list)  # all that make_comm created, in creation order

    def close(self, sync: bool = True) -> None:
        """Unmap the shared memory and destroy the groups; idempotent, and collective like ``make_comm``.

        Every rank destroys the groups in the order they were created. With ``sync`` a
        world barrier first makes sure no peer is still finishing a collective on them;
        after an error, when peers may never arrive, ``sync=False`` skips it. Once the
        default group is gone (which destroyed ours with it) there is nothing left to do.
        """
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if self.groups and dist.is_initialized():
            if sync:
                dist.barrier()
            for group in self.groups:
                dist.destroy_process_group(group)
        self.groups, self.tp_group = [], None

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout.tp > 1 and not (self.shm is not None and self.shm(x)):
            dist.all_reduce(x, group=self.tp_group)
        return x

    def tp_all_gather(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate uneven last-dim pieces from every TP rank (pads to the largest, then trims)."""
        if self.layout.tp == 1:
            return x
        width = max(sizes)
        padded = torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.tp_group)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    def send_next(self, x: torch.Tensor) -> None:
        """Hand activations to the same TP rank of the next pipeline stage."""
        stage, tp_rank = self.layout.coords(self.rank)
        dist.send(x.contiguous(), self.layout.rank_of(stage + 1, tp_rank))

    def recv_prev(self, like: torch.Tensor) -> torch.Tensor:
        stage, tp_rank = self.layout.coords(self.rank)
        dist.recv(like, self.layout.rank_of(stage - 1, tp_rank))
        return like

    def from_last_stage(self, x: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
        """Broadcast a tensor the last stage computed so that every rank returns it."""
        if self.layout.pp == 1:
            assert x is not None
            return x
        if x is None:
            x = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(x, self.layout.rank_of(self.layout.pp - 1, 0))
        return x


def make_comm(layout: Layout, device: torch.device | None = None) -> Comm:
    """Create the TP groups; every rank must call this, in the same order, since new_group is collective."""
    layout.check_world()
    if not dist.is_initialized():
        return Comm(layout, 0, None)
    rank = dist.get_rank()
    if layout.tp == 1:
        return Comm(layout, rank, None)
    stage_ranks = [[layout.rank_of(stage, t) for t in range(layout.tp)] for stage in range(layout.pp)]
    groups = [dist.new_group(ranks) for ranks in stage_ranks]
    stage, _ = layout.coords(rank)
    on_cpu = device is None or device.type == "cpu"
    timeout = float(os.environ.get("SHARDWISE_TIMEOUT", 1800))
    shm = attach(groups[stage], stage_ranks[stage], timeout) if on_cpu else None
    return Comm(layout, rank, groups[stage], shm, groups)
