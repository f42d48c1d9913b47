"""The process groups of a layout and the few collectives the runtime needs.

Every collective degrades to a no-op on a single rank, so the model code never
branches on whether it runs distributed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layout import Layout
from .shm import ShmAllReduce
from .shm import supported as shm_supported


@dataclass
class Comm:
    layout: Layout
    rank: int
    tp_group: dist.ProcessGroup | None
    shm: ShmAllReduce | None = None

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
    mine, my_ranks = None, []
    for stage in range(layout.pp):
        ranks = [layout.rank_of(stage, t) for t in range(layout.tp)]
        group = dist.new_group(ranks) if layout.tp > 1 else None
        if rank in ranks:
            mine, my_ranks = group, ranks
    on_cpu = device is None or device.type == "cpu"
    return Comm(layout, rank, mine, _shared_memory(mine, my_ranks) if on_cpu else None)


def _shared_memory(group: dist.ProcessGroup | None, ranks: list[int]) -> ShmAllReduce | None:
    """The shared-memory all-reduce for CPU tensors, where the whole TP group shares one host."""
    if group is None:
        return None
    hosts = [None] * len(ranks)
    dist.all_gather_object(hosts, (socket.gethostname(), shm_supported()), group=group)
    if len(set(hosts)) != 1 or not hosts[0][1]:
        return None
    return ShmAllReduce(group, ranks, timeout=float(os.environ.get("SHARDWISE_TIMEOUT", 1800)))
