"""Moving blocks of weights between the DP ranks into slot buffers: ZeRO-3's gathers and a series' broadcasts.

A ZeRO-3 gather collects every DP rank's equal-sized chunk of a block into one slot; a
series broadcast (across hosts: on one host a series shares its layers in place, see
``providers.series``) copies one rank's layer into a window (a slot) of every other rank.
On one host ZeRO-3's slots live in a shared-memory segment that every DP rank maps: a rank
writes its part of the slot and raises a flag, and once every flag is up the slot is read
in place, by every rank, with no further copy.
gloo's all-gather of the same bytes costs about as much CPU as computing with them (38
ms for a 25 MB block on the 2-core CI machine), and on few cores that time cannot hide
behind compute. Elsewhere (several hosts, accelerators, ``SHARDWISE_SHM=0``) the DP
group's all-gather or broadcast runs asynchronously into private slots.

A shared slot may be overwritten only once every rank is done with what it held. Ranks
make the same calls in the same order (their transfers are collective), so each slot
counts its acquisitions, releases and fills alike on every rank: a fill waits until
every peer has released all earlier uses of the slot, and a wait until every peer has
made the same fill. A rank that fails part-way through a transfer gives back what it took
and raises its failure flag, so its peers stop waiting for it within milliseconds instead
of at the timeout.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.distributed as dist

from ..plan.boxes import round_up
from .comm import Comm
from .shm import FLAG_STRIDE, TOKEN_BYTES, share, timeout_seconds, wait_for

SLOT_ALIGN = 64


class Gather:
    """Private slots, filled by the DP group's asynchronous all-gather or broadcast."""

    in_place = False  # whether ``claim`` hands out the slot's own memory to write this rank's chunk into

    def __init__(self, comm: Comm, slot_bytes: list[int], device: torch.device):
        self.comm = comm
        self.buffers = [torch.zeros(n, dtype=torch.uint8, device=device) for n in slot_bytes]
        self.pending: dict[int, dist.Work | None] = {}

    def acquire(self, slot: int) -> None:
        """A block starts using the slot, by a new fill or by what it already holds."""

    def claim(self, slot: int, nbytes: int) -> torch.Tensor | None:
        """Where to write this rank's next chunk for the slot, if the slot itself can take it."""
        self.wait(slot)
        return None

    def fill(self, slot: int, chunk: torch.Tensor, tag: int = 0) -> None:
        """Start gathering every rank's ``chunk`` into the slot, in DP order (after ``claim``); ``tag`` names what
        it holds, which the shared-memory transfer checks across ranks."""
        out = self.buffers[slot][: chunk.nbytes * self.comm.layout.dp]
        if self.comm.layout.dp == 1:
            out.copy_(chunk.view(torch.uint8))
            return
        self.pending[slot] = dist.all_gather_single(out, chunk.view(torch.uint8), group=self.comm.dp_group,
                                                    async_op=True)

    def broadcast(self, slot: int, source: int, tensor: torch.Tensor | None, nbytes: int) -> None:
        """Start sending DP rank ``source``'s ``tensor`` (None on every other rank) into the slot of the others.

        The source sends from the tensor itself, which must stay unchanged until the
        slot's next transfer; the others receive into the slot's first ``nbytes``.
        """
        self.wait(slot)
        buf = self.buffers[slot][:nbytes] if tensor is None else tensor.reshape(-1).view(torch.uint8)
        self.pending[slot] = dist.broadcast(buf, self.comm.dp_ranks[source], group=self.comm.dp_group, async_op=True)

    def wait(self, slot: int) -> None:
        work = self.pending.pop(slot, None)
        if work is not None:
            work.wait()

    def release(self, slot: int) -> None:
        """A block is done with the slot."""

    def fail(self) -> None:
        """This rank gave up part-way through a transfer. gloo has no way to say so: a peer's collective waits for
        its timeout (under ``launch`` the failing rank's error stops every rank at once)."""

    def close(self) -> None:
        self.buffers = []


class ShmGather(Gather):
    """Slots in a segment shared by the DP ranks of one host, written and read in place."""

    in_place = True

    def __init__(self, comm: Comm, slot_bytes: list[int], mem, me: int, timeout: float, what: str):
        self.comm, self.mem, self.me, self.timeout, self.what = comm, mem, me, timeout, what
        size, count = comm.layout.dp, len(slot_bytes)
        # Per slot and rank, each on a cache line of its own: uses released, fills made, and what the last fill
        # holds (a tag), so a rank that left the lockstep is caught instead of reading another block's bytes;
        # then per rank, whether it failed part-way through a transfer.
        self.flags = np.ndarray((count, 3, size, FLAG_STRIDE), dtype=np.int64, buffer=mem)[..., 0]
        self.failed = np.ndarray((size, FLAG_STRIDE), dtype=np.int64, buffer=mem,
                                 offset=count * 3 * size * FLAG_STRIDE * 8)[:, 0]
        offset = flag_bytes(count, size)
        self.buffers = []
        for n in slot_bytes:
            self.buffers.append(torch.frombuffer(mem, dtype=torch.uint8, count=n, offset=offset) if n else
                                torch.empty(0, dtype=torch.uint8))
            offset += _aligned(n)
        self.acquired = [0] * count
        self.held = [0] * count
        self.fills = [0] * count

    def acquire(self, slot: int) -> None:
        self.acquired[slot] += 1
        self.held[slot] += 1

    def _who(self, slot: int) -> str:
        return f"rank {self.comm.rank}: {self.what}, slot {slot}"

    def _gone(self) -> list[int]:
        """The ranks that failed part-way through a transfer."""
        return [self.comm.dp_ranks[r] for r in np.flatnonzero(self.failed)] if self.failed.any() else []

    def _wait_for(self, flags: np.ndarray, target: int, slot: int, ranks: list[int]) -> None:
        wait_for(flags, target, self.timeout, f"{self._who(slot)}: ranks", ranks, self._gone)

    def _free(self, slot: int) -> torch.Tensor:
        """The slot, once no peer still reads what it held."""
        self._wait_for(self.flags[slot, 0], self.acquired[slot] - self.held[slot], slot, self.comm.dp_ranks)
        return self.buffers[slot]

    def _raise(self, slot: int, tag: int) -> None:
        """Tell the peers this rank has made its part of the slot's next fill, which holds ``tag``."""
        self.fills[slot] += 1
        self.flags[slot, 2, self.me] = tag
        self.flags[slot, 1, self.me] = self.fills[slot]

    def claim(self, slot: int, nbytes: int) -> torch.Tensor:
        """This rank's part of the slot, once no peer still reads what the slot held."""
        return self._free(slot)[self.me * nbytes : (self.me + 1) * nbytes]

    def fill(self, slot: int, chunk: torch.Tensor, tag: int = 0) -> None:
        """Raise this rank's flag, the chunk copied into its part of the slot unless it was written there."""
        n = chunk.nbytes
        mine = self.buffers[slot][self.me * n : (self.me + 1) * n]
        if chunk.data_ptr() != mine.data_ptr():
            mine.copy_(chunk.reshape(-1).view(torch.uint8))
        self._raise(slot, tag)

    def wait(self, slot: int) -> None:
        """Wait for every rank's fill; a peer that filled the slot with something else is out of lockstep."""
        self._wait_for(self.flags[slot, 1], self.fills[slot], slot, self.comm.dp_ranks)
        tags = self.flags[slot, 2]
        if (tags != tags[self.me]).any():
            odd = [self.comm.dp_ranks[r] for r in range(len(tags)) if tags[r] != tags[self.me]]
            raise RuntimeError(f"{self._who(slot)}: ranks {odd} filled it with something else (tag {tags.tolist()}): "
                               "DP ranks must make the same provider calls")

    def release(self, slot: int) -> None:
        self.held[slot] -= 1
        self.flags[slot, 0, self.me] += 1

    def fail(self) -> None:
        """Tell the peers this rank gave up part-way through a transfer: their waits end with an error naming it."""
        self.failed[self.me] = 1

    def close(self) -> None:
        """Drop the segment: it is unmapped when the last view of it dies, never under a tensor still in use."""
        self.buffers, self.flags, self.failed, self.mem = [], None, None, None


def _aligned(n: int) -> int:
    return round_up(n, SLOT_ALIGN)


def flag_bytes(slots: int, ranks: int) -> int:
    return _aligned((slots * 3 + 1) * ranks * FLAG_STRIDE * 8)


def make_gather(comm: Comm, slot_bytes: list[int], device: torch.device, what: str) -> Gather:
    """Shared-memory slots when every DP rank of the group proves it maps the same segment (CPU only), else gloo's.

    ``what`` names the transfers in errors ("ZeRO-3 gather").
    """
    if comm.layout.dp > 1 and device.type == "cpu":
        total = flag_bytes(len(slot_bytes), comm.layout.dp) + sum(_aligned(n) for n in slot_bytes) + TOKEN_BYTES
        mem = share(comm.dp_group, comm.dp_ranks, total, what)
        if mem is not None:
            return ShmGather(comm, slot_bytes, mem, comm.dp_ranks.index(comm.rank), timeout_seconds(), what)
    return Gather(comm, slot_bytes, device)
