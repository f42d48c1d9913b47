"""The process groups of a layout and the few collectives the runtime needs.

Every collective degrades to a no-op on a single rank, so the model code never
branches on whether it runs distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..plan.mesh import Layout
from .group import Group
from .shm import ShmAllToAll, ShmCollectives, attach, attach_all_to_all, timeout_seconds


@dataclass
class Comm:
    """This rank's groups of the mesh: its TP group, its DP group, and its replica (for pipeline results).

    A group is None when it would hold this rank alone, and the replica group is None
    when the replica is the whole world (the default group serves).
    """

    layout: Layout
    rank: int
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    replica_group: dist.ProcessGroup | None = None
    dp_ranks: list[int] = field(default_factory=list)  # global ranks of the DP group, in DP order
    shm: ShmCollectives | None = None  # the TP group's collectives through shared memory (None: the backend)
    ep_shm: ShmAllToAll | None = None  # the EP group's all-to-all through shared memory (None: gloo)
    groups: list[dist.ProcessGroup] = field(default_factory=list)  # all that make_comm created, in creation order

    def close(self, sync: bool = True) -> None:
        """Unmap the shared memory and destroy the groups; idempotent, and collective like ``make_comm``.

        Every rank destroys the groups in the order they were created. With ``sync`` a
        world barrier first makes sure no peer is still finishing a collective on them;
        after an error, when peers may never arrive, ``sync=False`` skips it. Once the
        default group is gone (which destroyed ours with it) there is nothing left to do.
        """
        for shm in (self.shm, self.ep_shm):
            if shm is not None:
                shm.close()
        self.shm, self.ep_shm = None, None
        if self.groups and dist.is_initialized():
            if sync:
                dist.barrier()
            for group in self.groups:
                dist.destroy_process_group(group)
        self.groups, self.tp_group, self.dp_group, self.ep_group, self.replica_group = [], None, None, None, None

    def token_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` in place over the ranks that compute different tokens of a step: the EP group, whose ranks
        take their own rows of the batch (``RankPlan.batch_rows``), and the DP replicas."""
        for size, group in ((self.layout.ep, self.ep_group), (self.layout.dp, self.dp_group)):
            if size > 1:
                dist.all_reduce(x, group=group)
        return x

    @property
    def tp(self) -> Group | None:
        """The TP group with its shared-memory path (None: a TP group of this rank alone)."""
        return None if self.layout.tp == 1 else Group(self.tp_group, self.shm)

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        tp = self.tp
        return x if tp is None else tp.all_reduce(x)

    def tp_all_gather(self, x: torch.Tensor, sizes: list[int], dim: int = -1) -> torch.Tensor:
        """Concatenate uneven pieces from every TP rank along ``dim``."""
        tp = self.tp
        return x if tp is None else tp.all_gather(x, sizes, dim)

    def tp_reduce_scatter(self, x: torch.Tensor, sizes: list[int], dim: int = -1) -> torch.Tensor:
        """The TP group's sum of ``x``, this rank keeping its piece along ``dim`` (``sizes`` per TP rank)."""
        tp = self.tp
        return x if tp is None else tp.reduce_scatter(x, sizes, dim)

    def dp_max(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise max over the DP group, in place."""
        if self.layout.dp > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.dp_group)
        return x

    def dp_all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every DP rank: ranks in lockstep stop together."""
        if self.layout.dp == 1:
            return flag
        x = torch.tensor([int(flag)])
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.dp_group)
        return bool(x.item())

    @property
    def tp_rank(self) -> int:
        return self.layout.position(self.rank)[3]

    def stage_peer(self, offset: int) -> int:
        """The global rank ``offset`` stages on from this one at the same (replica, EP, TP) position: where its
        activations go and its gradients come from."""
        stage, d, e, t = self.layout.position(self.rank)
        return self.layout.rank_of(stage + offset, d, e, t)

    def send_next(self, x: torch.Tensor) -> None:
        """Hand activations to the same (replica, EP, TP) rank of the next pipeline stage (none when the rank has no
        rows of the batch: both ends know the shape)."""
        if x.numel():
            dist.send(x.contiguous(), self.stage_peer(1))

    def recv_prev(self, like: torch.Tensor) -> torch.Tensor:
        if like.numel():
            dist.recv(like, self.stage_peer(-1))
        return like

    def from_last_stage(self, x: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
        """Broadcast a tensor the replica's last stage computed so that every rank of the replica returns it."""
        if self.layout.pp == 1:
            assert x is not None
            return x
        if x is None:
            x = torch.empty(shape, dtype=dtype, device=device)
        _, d, _ = self.layout.coords(self.rank)
        dist.broadcast(x, self.layout.rank_of(self.layout.pp - 1, d, 0, 0), group=self.replica_group)
        return x


def make_comm(layout: Layout, device: torch.device | None = None) -> Comm:
    """Create the mesh's groups; every rank must call this, in the same order, since new_group is collective."""
    layout.check_world()
    if not dist.is_initialized():
        return Comm(layout, 0)
    comm = Comm(layout, dist.get_rank())

    def mine(candidates) -> tuple[dist.ProcessGroup | None, list[int]]:
        found: tuple[dist.ProcessGroup | None, list[int]] = (None, [comm.rank])
        for ranks in candidates:
            if 1 < len(ranks) < layout.world_size:
                group = dist.new_group(ranks)
                comm.groups.append(group)
                if comm.rank in ranks:
                    found = (group, ranks)
            elif comm.rank in ranks and len(ranks) > 1:
                found = (dist.group.WORLD, ranks)
        return found

    (comm.tp_group, tp_ranks), (comm.dp_group, comm.dp_ranks) = mine(layout.tp_groups()), mine(layout.dp_groups())
    if layout.ep > 1:
        comm.ep_group, ep_ranks = mine(layout.ep_groups())
    if layout.pp > 1:
        comm.replica_group = mine(layout.replica_groups())[0]
    on_cpu = device is None or device.type == "cpu"
    if layout.tp > 1 and on_cpu:
        comm.shm = attach(comm.tp_group, tp_ranks, timeout_seconds())
    if layout.ep > 1 and on_cpu:
        comm.ep_shm = attach_all_to_all(comm.ep_group, ep_ranks, timeout_seconds())
    return comm
