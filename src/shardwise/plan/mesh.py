"""The rank grid: a ``Layout`` is a PP x DP x EP x TP mesh; ``head_split`` places attention heads on its TP ranks.

Ranks are ordered (pp, dp, ep, tp), TP innermost as in torchtitan and Megatron, so a TP
group is a run of consecutive ranks. The EP ranks of a replica take the same ids, as its
TP ranks do: each holds a share of the routed experts and computes its own rows of the batch
(``RankPlan.batch_rows``; attention is split over TP within each), and tokens travel to their
experts' ranks and back (``model.moe``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from ..words import plural
from .boxes import split_evenly

if TYPE_CHECKING:
    from .tp import TpPlan


class LayoutError(ValueError):
    """No correct layout exists for this model on this grid."""


PLACEMENTS = ("contiguous", "round-robin")  # how EP ranks share out the routed experts (plan.rank.expert_shares)


@dataclass(frozen=True)
class Layout:
    """The mesh, and the TP plan that says how each tensor splits over its TP ranks (None: the model's own)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_plan: TpPlan | None = None
    ep: int = 1
    expert_placement: str = "contiguous"
    sp: bool = False  # sequence parallelism: between the TP blocks each TP rank holds its share of the tokens

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.dp < 1 or self.ep < 1:
            raise LayoutError(f"tp, pp, dp and ep must be >= 1, got {self}")
        if self.sp and self.tp == 1:
            raise LayoutError("sequence parallelism (sp) splits the tokens over the TP ranks: it needs tp > 1")
        if self.sp and self.ep > 1:
            raise LayoutError("sequence parallelism (sp) with expert parallelism (ep > 1) is not supported: choose one")
        if self.expert_placement not in PLACEMENTS:
            raise LayoutError(f"expert placement {self.expert_placement!r} is not one of {', '.join(PLACEMENTS)}")

    def __str__(self) -> str:
        ep = f" ep={self.ep}" if self.ep != 1 else ""
        return f"tp={self.tp}{' sp' if self.sp else ''} pp={self.pp} dp={self.dp}{ep}" + (
            f" {self.expert_placement}" if self.ep != 1 and self.expert_placement != "contiguous" else "")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.ep

    def position(self, rank: int) -> tuple[int, int, int, int]:
        """(pipeline stage, data-parallel rank, expert-parallel rank, tensor-parallel rank) of a global rank."""
        stage, rest = divmod(rank, self.dp * self.ep * self.tp)
        d, rest = divmod(rest, self.ep * self.tp)
        return (stage, d, *divmod(rest, self.tp))

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pipeline stage, data-parallel rank, tensor-parallel rank) of a global rank."""
        stage, d, _, t = self.position(rank)
        return stage, d, t

    def ep_rank(self, rank: int) -> int:
        return self.position(rank)[2]

    def rank_of(self, stage: int, dp_rank: int, ep_rank: int, tp_rank: int) -> int:
        """The global rank at a ``position``: every coordinate given, so none is taken for 0 by mistake."""
        return ((stage * self.dp + dp_rank) * self.ep + ep_rank) * self.tp + tp_rank

    def _every(self) -> Iterator[tuple[int, int, int]]:
        for stage in range(self.pp):
            for d in range(self.dp):
                for e in range(self.ep):
                    yield stage, d, e

    def tp_groups(self) -> Iterator[list[int]]:
        """Ranks that split each layer's heads: one group per (stage, replica, EP rank)."""
        for stage, d, e in self._every():
            yield [self.rank_of(stage, d, e, t) for t in range(self.tp)]

    def ep_groups(self) -> Iterator[list[int]]:
        """Ranks that share out each layer's routed experts: one group per (stage, replica, TP rank)."""
        for stage in range(self.pp):
            for d in range(self.dp):
                for t in range(self.tp):
                    yield [self.rank_of(stage, d, e, t) for e in range(self.ep)]

    def dp_groups(self) -> Iterator[list[int]]:
        """Ranks that hold the same piece of the model in different replicas: one group per (stage, EP rank, TP
        rank)."""
        for stage in range(self.pp):
            for e in range(self.ep):
                for t in range(self.tp):
                    yield [self.rank_of(stage, d, e, t) for d in range(self.dp)]

    def replica_groups(self) -> Iterator[list[int]]:
        """All ranks of one replica (every stage, EP and TP rank), which see the same input ids."""
        for d in range(self.dp):
            yield self.replica(d)

    def replica(self, d: int) -> list[int]:
        """The ranks of DP replica ``d``, one per (stage, EP rank, TP rank) position.

        Every replica computes with the same work tensors; the providers only change what each
        DP rank stores of them. So whatever the layout must satisfy, or sums within a replica, is
        found from replica 0's plans alone: the world's other replicas repeat it.
        """
        return [self.rank_of(stage, d, e, t) for stage in range(self.pp) for e in range(self.ep)
                for t in range(self.tp)]

    def in_replica(self, rank: int, d: int) -> int:
        """The rank at ``rank``'s stage, EP and TP position in replica ``d``."""
        stage, _, e, t = self.position(rank)
        return self.rank_of(stage, d, e, t)

    @classmethod
    def from_world(cls, pp: int = 1, dp: int = 1, ep: int = 1) -> Layout:
        """The layout that uses every rank of the initialized world, TP filling what PP, DP and EP leave."""
        world = dist.get_world_size()
        if world % (pp * dp * ep):
            raise LayoutError(f"world size {world} is not divisible by pp={pp} x dp={dp}"
                              + (f" x ep={ep}" if ep != 1 else ""))
        return cls(tp=world // (pp * dp * ep), pp=pp, dp=dp, ep=ep)

    def check_world(self) -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != self.world_size:
            raise LayoutError(f"layout {self} needs {plural(self.world_size, 'rank')}, the world has {world}")


@dataclass(frozen=True)
class Heads:
    """One TP rank's attention heads: query heads ``q`` and the KV heads ``kv`` they read."""

    q: tuple[int, int]
    kv: tuple[int, int]

    @property
    def n_q(self) -> int:
        return self.q[1] - self.q[0]

    @property
    def n_kv(self) -> int:
        return self.kv[1] - self.kv[0]


def head_split(heads: int, kv_heads: int, tp: int) -> list[Heads]:
    """GQA-aware head placement.

    A query head must sit with its KV head, so with tp <= kv_heads whole groups are
    split as evenly as possible (ranks may differ by a group). With more ranks than
    KV heads, each KV head is replicated over a run of ranks that split its group, as
    vLLM does; this works whenever tp <= heads, with no divisibility needed.
    """
    if tp > heads:
        raise LayoutError(f"tp={tp} exceeds the {heads} query heads: some rank would hold no attention head")
    group = heads // kv_heads
    if tp <= kv_heads:
        return [Heads((lo * group, hi * group), (lo, hi)) for lo, hi in split_evenly(kv_heads, tp)]
    out = []
    for kv, (r_lo, r_hi) in enumerate(split_evenly(tp, kv_heads)):
        for lo, hi in split_evenly(group, r_hi - r_lo):
            out.append(Heads((kv * group + lo, kv * group + hi), (kv, kv + 1)))
    return out
