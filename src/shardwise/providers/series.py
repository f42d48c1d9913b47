"""The series provider: weights stay resident, except each series' layers, which one DP rank stores for all.

A series (see ``plan.series``) keeps layer ``j`` only on DP rank ``j % n``. Every rank has,
per series, a ring of ``k + 1`` windows of the layer's shape. Reaching layer ``j``
(``gather``) starts the broadcast of layer ``j + k`` from its owner into a free window,
so it travels while layers ``j .. j + k - 1`` compute; ``get`` waits only for layer
``j``'s own window. Positions wrap around, so the last layers of one forward prefetch
the first layers of the next, as in decoding, where every step walks all layers again.

The owner computes from its own copy and sends from it, so what travels is the weight
as loaded (already cast, or quantized, once on the owner). The DP ranks must make the
same calls in the same order, since every broadcast is collective: generation keeps
the replicas in lockstep, as under ZeRO-3.
"""

from __future__ import annotations

import math
from collections import ChainMap
from dataclasses import dataclass, field

import torch

from ..dist.comm import Comm
from ..dist.transfers import make_gather
from ..plan.rank import RankPlan
from ..plan.series import SeriesPlan
from .resident import Resident


def series_memory(plan: RankPlan, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Bytes per series on this rank: the layers it stores (``held``), its ``windows``, and the ``unsharded``
    bytes every rank would hold without the series. What ``shardwise plan`` prints and the provider measures."""
    out = {}
    for s in plan.series:
        size = math.prod(s.shape) * dtype.itemsize
        out[str(s.series)] = {"held": len(s.owned(plan.dp_rank)) * size, "windows": s.windows * size,
                              "unsharded": len(s.names) * size}
    return out


@dataclass
class Ring:
    """One series' windows: the transfer slots ``first .. first + k``, and which series position each holds."""

    plan: SeriesPlan
    first: int
    holding: list[int | None] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)  # when each window was last filled: the oldest is reused

    def __post_init__(self) -> None:
        n = self.plan.windows
        self.holding, self.users, self.filled = [None] * n, [0] * n, [0] * n

    def find(self, position: int) -> int | None:
        return next((w for w, held in enumerate(self.holding) if held == position), None)

    def ahead(self, position: int) -> list[int]:
        """The positions a ring must hold once ``position`` is reached: it and the next k, wrapping around."""
        return [(position + i) % len(self.plan.names) for i in range(self.plan.windows)]


class SeriesProvider(Resident):
    lockstep = True  # every broadcast is collective over the DP group

    def __init__(self, plan: RankPlan, comm: Comm, tensors: dict[str, torch.Tensor], device: torch.device):
        super().__init__(plan, tensors)
        self.comm = comm
        self.rings: list[Ring] = []
        sizes: list[int] = []
        for s in plan.series:
            self.rings.append(Ring(s, len(sizes)))
            sizes += [math.prod(s.shape) * self.dtype.itemsize] * s.windows
        self.transfer = make_gather(comm, sizes, device, "series broadcast", broadcasts=True)
        self.members: dict[str, list[tuple[Ring, int]]] = {}  # block -> (ring, position) of its series tensors
        for ring in self.rings:
            for j, name in enumerate(ring.plan.names):
                self.members.setdefault(name.block, []).append((ring, j))
        self.taken: dict[str, list[tuple[Ring, int]]] = {}  # block -> (ring, window) it holds, gather to release
        self.clock = 0
        self.counts = {"gathers": 0, "bytes": 0, "hits": 0}

    def _start(self, block: str) -> None:
        """Reaching a layer: its windows and the next k of each series are filled, or on their way."""
        taken = []
        for ring, j in self.members.get(block, ()):
            wanted = ring.ahead(j)
            for position in wanted:
                if ring.find(position) is None:
                    self._fill(ring, position, wanted)
                elif position == j:
                    self.counts["hits"] += 1
            w = ring.find(j)
            self.transfer.acquire(ring.first + w)
            ring.users[w] += 1
            taken.append((ring, w))
        self.taken[block] = taken

    def _fill(self, ring: Ring, position: int, wanted: list[int]) -> None:
        """Start broadcasting the layer at ``position`` from its owner into the ring's oldest free window."""
        free = [w for w in range(ring.plan.windows) if ring.users[w] == 0 and ring.holding[w] not in wanted]
        if not free:
            busy = sorted({ring.plan.names[p] for p in ring.holding if p is not None})
            raise self._fail(f"series {ring.plan.series}: no free window for {ring.plan.names[position]} "
                             f"({', '.join(busy)} are held): release a block first")
        w = min(free, key=lambda i: ring.filled[i])
        self.clock += 1
        ring.holding[w], ring.filled[w] = position, self.clock
        name, owner = ring.plan.names[position], ring.plan.owners[position]
        tag = (ring.first + 1) << 32 | position  # which ring, which layer: checked by every reader
        nbytes = self.transfer.buffers[ring.first + w].nbytes
        self.transfer.broadcast(ring.first + w, owner, self.tensors.get(name), nbytes, tag)
        self.counts["gathers"] += 1
        self.counts["bytes"] += 0 if name in self.tensors else nbytes

    def _wait(self, block: str) -> ChainMap:
        """The held tensors, with each series layer this rank does not own read from its window."""
        received = {}
        for (ring, w), (_, j) in zip(self.taken[block], self.members.get(block, ())):
            name = ring.plan.names[j]
            if name not in self.tensors:
                slot = ring.first + w
                self.transfer.wait(slot)
                received[name] = self.transfer.buffers[slot].view(self.dtype).view(ring.plan.shape)
        return ChainMap(received, self.tensors)

    def _end(self, block: str) -> None:
        for ring, w in self.taken.pop(block):
            ring.users[w] -= 1
            self.transfer.release(ring.first + w)

    def invalidate(self) -> None:
        """The weights changed: what the windows hold is stale and is broadcast again when next reached."""
        for ring in self.rings:
            ring.holding = [None] * ring.plan.windows

    def stats(self) -> dict[str, int]:
        """Broadcasts started, bytes received into windows, and layers found already in their window."""
        return dict(self.counts)

    def series_nbytes(self) -> dict[str, dict[str, int]]:
        """Measured bytes per series, as ``series_memory`` predicts them: the layers stored here, and the windows."""
        out = {}
        for ring in self.rings:
            held = [self.tensors[n] for n in ring.plan.names if n in self.tensors]
            windows = self.transfer.buffers[ring.first : ring.first + ring.plan.windows]
            out[str(ring.plan.series)] = {"held": sum(t.nbytes for t in held),
                                          "windows": sum(b.nbytes for b in windows)}
        return out

    def nbytes(self) -> dict[str, int]:
        return super().nbytes() | {"work": sum(b.nbytes for b in self.transfer.buffers)}

    def close(self) -> None:
        super().close()
        self.transfer.close()
