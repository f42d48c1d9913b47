"""Who owns each element of the model: the lowest rank that holds it, found from mesh coordinates.

Export writes each byte once, a sharded save stores each element once and a global gradient
norm counts each element once, all through ``RankPlan.owned()``. An element a rank holds may
also sit on ranks of its own stage (its TP peers hold a replicated KV head or norm, its EP
peers everything but the routed experts, its DP peers a replica) and, on the last stage, on the
first (a tied embedding). Walking every lower rank's plan costs the world size. It need not:
a position's work tensors (its stage, EP and TP rank) are the same on every DP rank, and what
each DP rank holds of them is the provider's rule: all of it (resident), its own series layers
and all the rest (series), its chunk of each flat block (ZeRO-3). So for each position that
holds one of the rank's sources, the lowest DP rank holding each element is computed, not
searched, and the owner is the lowest rank among the positions: a few plans per rank, whatever
the number of replicas.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .boxes import Box, first_holders, ravel
from .flat import rectangles

if TYPE_CHECKING:
    from .rank import RankPlan


def owned(plan: RankPlan) -> list[tuple[str, Box]]:
    """``plan``'s (held tensor, box) pairs covering the elements it owns (see ``RankPlan.owned``)."""
    mine = [(name, box) for name, t in plan.tensors.items() for box in t.boxes]
    sources = {box.source for _, box in mine}
    lower = [((rank, ""), piece) for position in _positions(plan, sources) for _, box in mine
             for rank, piece in lowest_dp_holders(position, box) if rank < plan.rank]
    held = lower + [((plan.rank, name), box) for name, box in mine]
    return [(name, box) for (rank, name), box in first_holders(held) if rank == plan.rank]


def _positions(plan: RankPlan, sources: set[str]) -> Iterator[RankPlan]:
    """The DP rank 0 plan of every position at or below ``plan``'s rank that may hold one of ``sources``.

    Only the embedding and head blocks hold sources outside one stage's layers, and every
    position of a stage holds them alike, so a lower stage is consulted only when its position
    at this rank's EP and TP coordinates holds one of the sources (the first stage, for the last
    stage's tied LM head).
    """
    layout = plan.layout
    stage, _, ep_rank, tp_rank = layout.position(plan.rank)
    stages = [s for s in range(stage) if sources & plan.peer(layout.rank_of(s, 0, ep_rank, tp_rank)).by_source.keys()]
    for s in [*stages, stage]:
        for e in range(layout.ep):
            for t in range(layout.tp):
                first = layout.rank_of(s, 0, e, t)
                if first <= plan.rank:
                    yield plan.peer(first)


def lowest_dp_holders(position: RankPlan, region: Box) -> Iterator[tuple[int, Box]]:
    """The parts of the source region ``region`` that ``position``'s DP group holds, each with the global rank of
    the lowest DP rank holding it (pieces carry their source range; their offsets are not this rank's)."""
    layout = position.layout
    stage, _, ep_rank, tp_rank = layout.position(position.rank)
    for name, box in position.by_source.get(region.source, ()):
        part = box.intersect(region.start, region.stop)
        if part is not None:
            for d, piece in _first_dp_rank(position, name, part):
                yield layout.rank_of(stage, d, ep_rank, tp_rank), piece


def _first_dp_rank(position: RankPlan, name: str, part: Box) -> Iterator[tuple[int, Box]]:
    """``part`` of work tensor ``name``, cut where the DP rank holding it changes, each piece with that DP rank."""
    if position.provider != "zero3":
        owner = next((o for s in position.series for n, o in zip(s.names, s.owners) if n == name), 0)
        yield owner, part
        return
    flat = position.flats[name.block]
    member = next(m for m in flat.members if m.name == name)
    last = tuple(o + n - 1 for o, n in zip(part.offset, part.shape))
    first_at, last_at = member.offset + ravel(part.offset, member.shape), member.offset + ravel(last, member.shape)
    for d in range(first_at // flat.chunk, last_at // flat.chunk + 1):
        lo, hi = flat.owned(d)
        lo, hi = max(lo, member.offset) - member.offset, min(hi, member.offset + member.numel) - member.offset
        for _, rect_lo, rect_hi in rectangles(member.shape, lo, hi):
            piece = part.placed_within(rect_lo, rect_hi)
            if piece is not None:
                yield d, piece

