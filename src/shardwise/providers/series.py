"""The series provider: weights stay resident, except each series' layers, which one DP rank stores for all.

A series (see ``plan.series``) keeps layer ``j`` only on DP rank ``j % n``. Two ways bring
the other ranks' layers to a rank, chosen by ``series_provider``:

- On one host (every DP rank maps the same shared memory, CPU), the owners place their
  layers in one segment the DP group maps (``SharedSeries``): each layer is held once per
  host and every rank computes from the owner's copy in place. Nothing travels per step,
  and the replicas need not keep in step.
- Elsewhere (``SeriesProvider``), every rank has, per series, a ring of ``k + 1`` windows
  of the layer's shape. Reaching layer ``j`` (``gather``) starts the broadcast of layer
  ``j + k`` from its owner into a free window, so it travels while layers ``j .. j + k - 1``
  compute; ``get`` waits only for layer ``j``'s own window. Positions wrap around, so the
  last layers of one forward prefetch the first layers of the next, as in decoding, where
  every step walks all layers again. The owner computes from its own copy and sends from
  it, so what travels is the weight as loaded (already cast, or quantized, once on the
  owner). The DP ranks must make the same calls in the same order, since every broadcast
  is collective: generation keeps the replicas in lockstep, as under ZeRO-3.
"""

from __future__ import annotations

import math
from collections import ChainMap
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..dist.comm import Comm
from ..dist.shm import TOKEN_BYTES, share
from ..dist.transfers import SLOT_ALIGN, Gather
from ..plan.boxes import round_up
from ..plan.rank import RankPlan
from ..plan.series import SeriesPlan
from .base import Provider
from .resident import Resident
from .weights import release_pages


def series_memory(plan: RankPlan, dtype: torch.dtype, shared: bool = False) -> dict[str, dict[str, int]]:
    """Bytes per series on this rank: the layers it stores (``held``), its ``windows`` (none when the DP ranks
    share the layers on one host), and the ``unsharded`` bytes every rank would hold without the series. What
    ``shardwise plan`` prints and the provider measures."""
    out = {}
    for s in plan.series:
        size = math.prod(s.shape) * dtype.itemsize
        out[str(s.series)] = {"held": len(s.owned(plan.dp_rank)) * size, "windows": 0 if shared else s.windows * size,
                              "unsharded": len(s.names) * size}
    return out


def series_provider(plan: RankPlan, comm: Comm, tensors: dict[str, torch.Tensor], device: torch.device) -> Provider:
    """The series layers shared in place when every DP rank proves it maps the same memory (CPU), else broadcast."""
    if device.type == "cpu":
        shared = share_layers(plan, comm, tensors)
        if shared is not None:
            return SharedSeries(plan, comm, tensors, shared)
    return SeriesProvider(plan, comm, tensors, device)


def share_layers(plan: RankPlan, comm: Comm, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every series layer of this stage as a view of one segment the DP group maps, each written by its owner, or
    None unless every DP rank maps it. Collective over the DP group."""
    dtype = next(t for t in tensors.values() if isinstance(t, torch.Tensor)).dtype
    places, total = {}, 0
    for s in plan.series:
        for name in s.names:
            places[name] = (total, s.shape)
            total += round_up(math.prod(s.shape) * dtype.itemsize, SLOT_ALIGN)
    mem = share(comm.dp_group, comm.dp_ranks, total + TOKEN_BYTES, "series layers")
    if mem is None:
        return None
    layers = {name: torch.frombuffer(mem, dtype=torch.uint8, count=math.prod(shape) * dtype.itemsize, offset=at)
              .view(dtype).view(shape) for name, (at, shape) in places.items()}
    for name, layer in layers.items():
        if name in tensors:
            layer.copy_(tensors[name])
            release_pages(tensors[name])  # held once per host, in the segment
    dist.barrier(group=comm.dp_group)  # every owner has written its layers
    return layers


class SharedSeries(Resident):
    """Series layers in one segment the DP ranks of a host share: each stored once, read in place by every rank.

    The owner's layers are its views of the segment (its private copies are dropped), so an
    update of them reaches every rank. Updates are the one time ranks must agree: no rank may
    read a layer its owner is changing, so ``begin_update`` and ``invalidate`` (the end of an
    update) wait for the whole DP group.
    """

    def __init__(self, plan: RankPlan, comm: Comm, tensors: dict[str, torch.Tensor],
                 layers: dict[str, torch.Tensor]):
        super().__init__(plan, {name: layers.get(name, t) for name, t in tensors.items()})
        self.comm, self.layers = comm, layers

    def _wait(self, block: str) -> ChainMap:
        return ChainMap(self.layers, self.tensors)

    def begin_update(self) -> None:
        super().begin_update()
        dist.barrier(group=self.comm.dp_group)  # no rank still computes from a layer about to change

    def invalidate(self) -> None:
        dist.barrier(group=self.comm.dp_group)  # every owner has finished changing its layers

    def series_nbytes(self) -> dict[str, dict[str, int]]:
        """Measured bytes per series, as ``series_memory(shared=True)`` predicts them: the layers this rank stores
        (in the segment), and no windows."""
        return {str(s.series): {"held": sum(self.layers[n].nbytes for n in s.owned(self.plan.dp_rank)), "windows": 0}
                for s in self.plan.series}

    def close(self) -> None:
        super().close()
        self.layers = {}


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
        self.transfer = Gather(comm, sizes, device)
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
        nbytes = self.transfer.buffers[ring.first + w].nbytes
        self.transfer.broadcast(ring.first + w, owner, self.tensors.get(name), nbytes)
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
