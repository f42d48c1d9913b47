"""How each local gradient must be reduced over tensor parallelism, derived from the plan's boxes.

With the TP collectives carrying their backward (``collectives``, ``layers``), most local
gradients come out complete: a TP-sharded tensor's gradient is its own, and a tensor
replicated on every TP rank but applied to the replicated hidden state (the RMSNorms,
the biases added after a row-parallel reduce) gets the same full gradient everywhere.
What remains partial is a region several TP ranks hold but each applies to *its own*
attention heads: the q/k norms (one head_dim vector for all heads), and KV-head rows of
the fused qkv when there are more TP ranks than KV heads. Each rank's gradient of such
a region covers only its heads, and the true gradient is their sum.

Which regions those are is not listed by hand per tensor: a tensor used per head
(``PER_HEAD``) has a partial region exactly where the plans of the TP group hold the
same box. ``tp_partials`` finds them, and ``TpGradReducer`` sums each over the ranks
that share it (one process group per distinct set of ranks, created collectively).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layout import RankPlan

PER_HEAD = ("qkv", "qkv_bias", "q_norm", "k_norm")  # short names of tensors applied head by head


@dataclass(frozen=True)
class Partial:
    """A local region of ``name`` whose gradient is partial on each of ``ranks`` (global ranks) and sums there."""

    name: str
    index: tuple[slice, ...]
    ranks: tuple[int, ...]


def tp_partials(plan: RankPlan) -> tuple[Partial, ...]:
    """This rank's regions of per-head tensors that other ranks of its TP group hold too."""
    layout = plan.layout
    stage, dp_rank, _ = layout.coords(plan.rank)
    peers = [plan.peer(layout.rank_of(stage, dp_rank, t)) for t in range(layout.tp)] if layout.tp > 1 else []
    out = []
    for name, tensor in plan.work.items():
        if name.rsplit(".", 1)[-1] not in PER_HEAD or name in plan.alias:
            continue
        for box in tensor.boxes:
            sharing = tuple(p.rank for p in peers if any(b.region == box.region for b in p.work[name].boxes))
            if len(sharing) > 1:
                out.append(Partial(name, box.local_index(), sharing))
    return tuple(out)


def _every_group(plan: RankPlan) -> list[tuple[int, ...]]:
    """Every distinct set of ranks any rank of the layout sums a partial gradient over, in one order for all."""
    return sorted({p.ranks for rank in range(plan.layout.world_size) for p in tp_partials(plan.peer(rank))})


class TpGradReducer:
    """Sums the partial TP gradients of one rank's work tensors; construction is collective over the world."""

    def __init__(self, plan: RankPlan):
        self.partials = tp_partials(plan)
        self.groups: dict[tuple[int, ...], dist.ProcessGroup] = {}  # the ones this rank is in
        self.created: list[dist.ProcessGroup] = []
        if dist.is_initialized():
            for ranks in _every_group(plan):  # new_group is collective: every rank creates every group, in order
                self.created.append(dist.new_group(list(ranks)))
                if plan.rank in ranks:
                    self.groups[ranks] = self.created[-1]

    def reduce(self, grads: dict[str, torch.Tensor]) -> None:
        """Sum each partial region of ``grads`` (local work name -> gradient) in place over the ranks sharing it."""
        for p in self.partials:
            region = grads[p.name][p.index]
            summed = region.contiguous()
            dist.all_reduce(summed, group=self.groups[p.ranks])
            region.copy_(summed)

    def close(self) -> None:
        """Destroy the groups, in creation order on every rank (collective, like the construction)."""
        for group in self.created:
            dist.destroy_process_group(group)
        self.groups, self.created = {}, []
