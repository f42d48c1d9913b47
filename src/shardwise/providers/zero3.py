"""ZeRO-3: each DP rank keeps 1/dp of every block as its master, and a block is gathered just before use.

A block's work tensors are views of one flat buffer (see ``flat``), gathered with one
collective into one of ``prefetch + 1`` rotating slots; the embedding and the head have
a slot each, and a tied LM head on the embedding's stage reads the embedding's.
Block ``l + k`` is in flight while block ``l`` computes.

The master dtype and the work dtype are independent. When they differ, each rank casts
or quantizes (``quant``) its chunk before the gather, so the gather moves the narrow
bytes. A slot remembers which version of which block it holds: until ``invalidate()``
(after the masters change) a block still in a slot is not gathered again.

Masters may live in host memory (``offload``, pinned when the device is an
accelerator). An optimizer step reaches them through the update hooks: a fetch into
one of two device buffers before a block's update and a write-back after it, so one
block's copy overlaps the next one's update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dist.comm import Comm
from ..dist.transfers import make_gather
from ..plan.flat import FlatBlock
from ..plan.rank import RankPlan
from .base import Provider
from .quant import Quantizer, chunk_bytes, is_quantized

OWN_SLOTS = ("embed", "head")  # gathered into a slot of their own, outside the rotation of the layers


@dataclass(frozen=True)
class Sizes:
    """Bytes of one slot: what it receives, what it sends, and the dequantized work tensors."""

    wire: int
    send: int
    work: int


def wire_chunk(flat: FlatBlock, master: torch.dtype, work: torch.dtype) -> int:
    """Bytes each DP rank sends of ``flat``: its chunk in the work dtype, or quantized (``quant``: matrices only)."""
    return chunk_bytes(flat, master) if is_quantized(work) else flat.chunk * work.itemsize


def slot_sizes(flat: FlatBlock, master: torch.dtype, work: torch.dtype, shared: bool) -> Sizes:
    """What gathering ``flat`` needs: a send buffer only when the chunk must be cast or quantized first, and the
    slot is not ``shared`` memory that takes the converted chunk in place."""
    chunk = wire_chunk(flat, master, work)
    wire = flat.parts * chunk
    send = chunk if work != master and not shared else 0
    dequantized = flat.numel * master.itemsize if is_quantized(work) else 0
    return Sizes(wire, send, dequantized)


def slots(plan: RankPlan, master: torch.dtype, work: torch.dtype, prefetch: int,
          shared: bool) -> dict[str, Sizes]:
    """The slots a rank allocates, by name: ``ring.i`` for the layers, then the embedding's and the head's."""
    layers = [f for name, f in plan.flats.items() if name not in OWN_SLOTS]
    out = {}
    if layers:
        sizes = [slot_sizes(f, master, work, shared) for f in layers]
        biggest = Sizes(*(max(getattr(s, k) for s in sizes) for k in ("wire", "send", "work")))
        out |= {f"ring.{i}": biggest for i in range(min(prefetch + 1, len(layers)))}
    return out | {name: slot_sizes(plan.flats[name], master, work, shared) for name in OWN_SLOTS if name in plan.flats}


def memory_plan(plan: RankPlan, master: torch.dtype, work: torch.dtype | None, prefetch: int, offload: bool,
                shared: bool = False) -> dict[str, int]:
    """Bytes a ZeRO-3 rank holds, by role: what ``shardwise plan`` prints and ``Zero3.nbytes`` measures.

    With ``shared`` slots (DP ranks on one host) the work buffers are one segment all of
    them map, and chunks are converted straight into it, so nothing is staged.
    """
    work = work or master
    sizes = slots(plan, master, work, prefetch, shared).values()
    fetch = 2 * max((b.numel for b in plan.buffers), default=0) * master.itemsize if offload else 0
    return {"masters": sum(b.numel for b in plan.buffers) * master.itemsize,
            "work": sum(s.wire + s.work for s in sizes),
            "staging": sum(s.send for s in sizes) + fetch}


class Slot:
    """One gather buffer (``wire``, the transfer's slot ``index``) and what it currently holds."""

    def __init__(self, index: int, wire: torch.Tensor, sizes: Sizes, compute: torch.dtype, device: torch.device):
        self.index, self.wire = index, wire
        self.send = torch.zeros(sizes.send, dtype=torch.uint8, device=device)
        self.work = torch.zeros(sizes.work, dtype=torch.uint8, device=device) if sizes.work else self.wire
        self.compute = compute
        self.flat: str | None = None
        self.version = -1
        self.users = 0
        self.used = 0  # when it was last taken, for least-recently-used reuse
        self.ready = False

    def views(self, flat: FlatBlock) -> dict[str, torch.Tensor]:
        buf = self.work[: flat.numel * self.compute.itemsize].view(self.compute)
        return {m.name: buf[m.offset : m.offset + m.numel].view(m.shape) for m in flat.members}


class Zero3(Provider):
    def __init__(self, plan: RankPlan, comm: Comm, masters: dict[str, torch.Tensor], work_dtype: torch.dtype | None,
                 prefetch: int, offload: bool, device: torch.device):
        dtypes = {t.dtype for t in masters.values()}
        if len(dtypes) != 1:
            raise ValueError(f"rank {plan.rank}: ZeRO-3 masters must share one dtype, got {sorted(map(str, dtypes))}")
        self.master_dtype = dtypes.pop()
        self.wire_dtype = work_dtype or self.master_dtype
        self.compute = self.master_dtype if is_quantized(self.wire_dtype) else self.wire_dtype
        super().__init__(plan, self.compute)
        self.lockstep = plan.layout.dp > 1
        self.comm, self.prefetch, self.device, self.offload = comm, prefetch, device, offload
        self.masters = masters  # in host memory with ``offload`` (pinned by the loader on an accelerator)
        wire = [s.wire for s in slots(plan, self.master_dtype, self.wire_dtype, prefetch, False).values()]
        self.transfer = make_gather(comm, wire, device, "ZeRO-3 gather")
        sizes = slots(plan, self.master_dtype, self.wire_dtype, prefetch, self.transfer.in_place)
        self.slots = {name: Slot(i, self.transfer.buffers[i], s, self.compute, device)
                      for i, (name, s) in enumerate(sizes.items())}
        self.home = {m.name: name for name, flat in plan.flats.items() for m in flat.members}
        self.versions = dict.fromkeys(plan.flats, 0)
        self.quantizers = ({name: Quantizer(flat, plan.dp_rank, self.wire_dtype, self.compute)
                            for name, flat in plan.flats.items()} if is_quantized(self.wire_dtype) else {})
        self.scales: dict[str, tuple[int, torch.Tensor]] = {}
        largest = max((t.numel() for t in masters.values()), default=0)
        self.fetch_buffers = [torch.empty(largest, dtype=self.master_dtype, device=device) for _ in range(2)] \
            if offload else []
        self.fetch_slots: dict[str, int] = {}  # block -> fetch buffer holding its master
        self.counts = {"gathers": 0, "bytes": 0, "hits": 0}
        self.clock = 0
        self.taken: dict[str, list[Slot]] = {}  # block -> the slots it holds, from gather to release

    # Gathering.

    def _flats(self, block: str) -> list[str]:
        """The flat blocks a block's tensors live in: its own, plus the embedding's for a tied head."""
        return list(dict.fromkeys(self.home[self.plan.alias.get(n, n)] for n in self.plan.blocks[block]))

    def _holding(self, flat: str) -> Slot | None:
        return next((s for s in self.slots.values() if s.flat == flat and s.version == self.versions[flat]), None)

    def _free_slot(self, flat: str) -> Slot:
        if flat in OWN_SLOTS:
            candidates = [self.slots[flat]]
        else:
            candidates = [s for name, s in self.slots.items() if name.startswith("ring.")]
        free = [s for s in candidates if s.users == 0]
        if not free:
            busy = ", ".join(sorted({s.flat for s in candidates}))
            raise self._fail(f"no free buffer for {flat!r}: {busy} still in use (release a block first, or raise "
                             f"prefetch above {self.prefetch})")
        return min(free, key=lambda s: s.used)

    def _start(self, block: str) -> None:
        """Take a slot for each flat the block needs (all chosen before any is touched), and fill the stale ones.

        A fill that fails gives back every slot this call took: the block holds nothing, as if
        never gathered, and the peers are told (``_refill``).
        """
        chosen = [(flat, self._holding(flat)) for flat in self._flats(block)]
        chosen = [(flat, slot, slot is not None) if slot else (flat, self._free_slot(flat), False)
                  for flat, slot in chosen]
        taken: list[Slot] = []
        try:
            for flat, slot, hit in chosen:
                self.clock += 1
                self.transfer.acquire(slot.index)
                slot.users += 1
                slot.used = self.clock
                taken.append(slot)
                if hit:
                    self.counts["hits"] += 1
                else:
                    self._refill(slot, flat)
        except BaseException:
            for slot in taken:
                slot.users -= 1
                self.transfer.release(slot.index)
            raise
        self.taken[block] = taken

    def _refill(self, slot: Slot, flat: str) -> None:
        """``_fill``; one that fails leaves the slot holding nothing, and tells the peers, whose wait for this rank's
        part would otherwise last until the timeout."""
        try:
            self._fill(slot, flat)
        except BaseException:
            slot.flat, slot.version = None, -1
            self.transfer.fail()
            raise

    def _fill(self, slot: Slot, flat: str) -> None:
        """Start gathering the current version of ``flat`` into ``slot``."""
        slot.flat, slot.version, slot.ready = flat, self.versions[flat], False
        nbytes = wire_chunk(self.plan.flats[flat], self.master_dtype, self.wire_dtype)
        region = self.transfer.claim(slot.index, nbytes)
        tag = list(self.plan.flats).index(flat) << 32 | self.versions[flat]
        self.transfer.fill(slot.index, self._outgoing(flat, slot.send if region is None else region), tag)
        self.counts["gathers"] += 1
        self.counts["bytes"] += self.plan.flats[flat].parts * nbytes

    def _outgoing(self, flat: str, send: torch.Tensor) -> torch.Tensor:
        """This rank's chunk as the gather sends it: the master itself, or cast or quantized into ``send``."""
        master = self.masters[flat]
        if master.device != self.device:
            master = master.to(self.device, non_blocking=True)
        if self.wire_dtype == self.master_dtype:
            return master
        if flat in self.quantizers:
            return self.quantizers[flat].quantize(master, self._scales(flat, master), send)
        send = send[: master.numel() * self.wire_dtype.itemsize]
        send.view(self.wire_dtype).copy_(master)
        return send

    def _scales(self, flat: str, master: torch.Tensor) -> torch.Tensor:
        """The block's scales for the current masters, agreed over the DP group once per version."""
        version, scales = self.scales.get(flat, (-1, None))
        if version != self.versions[flat]:
            quantizer = self.quantizers[flat]
            scales = quantizer.scales(self.comm.dp_max(quantizer.local_absmax(master)))
            self.scales[flat] = (self.versions[flat], scales)
        return scales

    def _wait(self, block: str) -> dict[str, torch.Tensor]:
        """The block's tensors; one gathered before the masters changed is gathered again (every DP rank alike)."""
        out: dict[str, torch.Tensor] = {}
        for flat, slot in zip(self._flats(block), self.taken[block]):
            if slot.version != self.versions[flat]:
                if slot.users > 1:  # the tied embedding's slot, also held by the other block
                    raise self._fail(f"get({block!r}): {flat!r} changed since it was gathered, and another block "
                                     "still holds it; release both before updating the masters")
                self._refill(slot, flat)
            self.transfer.wait(slot.index)
            views = slot.views(self.plan.flats[flat])
            if not slot.ready and flat in self.quantizers:
                self.quantizers[flat].dequantize(slot.wire, self.scales[flat][1], views)
            slot.ready = True
            out |= views
        return {n: out[self.plan.alias.get(n, n)] for n in self.plan.blocks[block]}

    def _end(self, block: str) -> None:
        for slot in self.taken.pop(block):
            slot.users -= 1
            self.transfer.release(slot.index)

    def invalidate(self) -> None:
        for flat in self.versions:
            self.versions[flat] += 1

    # Updating the masters.

    def _fetch(self, block: str) -> None:
        if not self.offload:
            return
        free = [i for i in range(2) if i not in self.fetch_slots.values()]
        if not free:
            raise self._fail(f"fetch_master({block!r}): both fetch buffers hold {', '.join(self.fetch_slots)}; "
                             f"release_master one first")
        master = self.masters[block]
        self.fetch_buffers[free[0]][: master.numel()].copy_(master, non_blocking=True)
        self.fetch_slots[block] = free[0]

    def _at_rest(self, block: str) -> dict[str, torch.Tensor]:
        return {block: self.masters[block]}

    def _master(self, block: str) -> dict[str, torch.Tensor]:
        if not self.offload:
            return self._at_rest(block)
        return {block: self.fetch_buffers[self.fetch_slots[block]][: self.masters[block].numel()]}

    def _write_back(self, block: str) -> None:
        if self.offload:
            i = self.fetch_slots.pop(block)
            self.masters[block].copy_(self.fetch_buffers[i][: self.masters[block].numel()], non_blocking=True)

    def _finish_update(self) -> None:
        if self.offload and self.device.type != "cpu":
            torch.accelerator.synchronize()

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def close(self) -> None:
        super().close()
        self.slots = {}
        self.transfer.close()

    def nbytes(self) -> dict[str, int]:
        slots = self.slots.values()
        work = sum(s.wire.nbytes + (s.work.nbytes if s.work is not s.wire else 0) for s in slots)
        return {"masters": sum(t.nbytes for t in self.masters.values()), "work": work,
                "staging": sum(s.send.nbytes for s in slots) + sum(b.nbytes for b in self.fetch_buffers)}
