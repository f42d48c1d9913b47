"""All-reduce through shared memory for TP ranks on one host, the CPU decode fast path.

Token-by-token decoding sends a few kilobytes per collective, so its speed is set by
latency, and gloo's loopback TCP costs 1-3 ms per all-reduce, which is most of the time
of a decode step. Here each rank copies its tensor into its slot of a shared
segment, raises its sequence flag, waits for every flag, and sums the slots in rank
order, so every rank gets bit-identical results. Slots are double-buffered: a rank
can only write step n+2 after all ranks have passed step n+1, by which time every
rank has finished reading step n.

The flag protocol relies on x86's total store order (data stores become visible
before the flag store), so it is used only on x86-64; elsewhere gloo serves.
"""

from __future__ import annotations

import logging
import mmap
import os
import platform
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

FLAG_STRIDE = 8  # int64s per flag: one 64-byte cache line each, so ranks never share a line
CAPACITY = 4 << 20  # bytes per slot; larger tensors (long prefills) go through gloo


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and os.environ.get("SHARDWISE_SHM", "1") != "0"


class ShmAllReduce:
    def __init__(self, group: dist.ProcessGroup, ranks: list[int], timeout: float):
        self.size = len(ranks)
        self.rank = ranks.index(dist.get_rank())
        self.timeout = timeout
        self.seq = 0
        flags_bytes = self.size * FLAG_STRIDE * 8
        total = flags_bytes + 2 * self.size * CAPACITY
        name = [f"/dev/shm/shardwise-{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=ranks[0], group=group)
        if self.rank == 0:
            fd = os.open(name[0], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, total)
        dist.barrier(group=group)
        if self.rank != 0:
            fd = os.open(name[0], os.O_RDWR)
        self.mem = mmap.mmap(fd, total)
        os.close(fd)
        dist.barrier(group=group)
        if self.rank == 0:
            os.unlink(name[0])  # every rank has it mapped; nothing is left behind if a rank dies
        self.flags = np.ndarray((self.size * FLAG_STRIDE,), dtype=np.int64, buffer=self.mem)[::FLAG_STRIDE]
        self.data = torch.frombuffer(self.mem, dtype=torch.uint8, offset=flags_bytes)

    def _slot(self, buf: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        start = (buf * self.size + rank) * CAPACITY
        n = like.numel() * like.element_size()
        return self.data[start : start + n].view(like.dtype).view(like.shape)

    def _wait_all(self) -> None:
        spins, deadline = 0, None
        while int(self.flags.min()) < self.seq:
            spins += 1
            if spins > 64:
                os.sched_yield()  # ranks may outnumber cores: let the laggard run
            if spins % 4096 == 0:
                deadline = deadline or time.monotonic() + self.timeout
                if time.monotonic() > deadline:
                    late = [r for r in range(self.size) if self.flags[r] < self.seq]
                    raise TimeoutError(f"shared-memory all-reduce: TP ranks {late} did not arrive "
                                       f"within {self.timeout:.0f}s (dead peer?)")

    def __call__(self, x: torch.Tensor) -> bool:
        """Sum ``x`` over the group in place; False (nothing done) when it does not fit."""
        if x.device.type != "cpu" or x.numel() * x.element_size() > CAPACITY or not x.is_contiguous():
            return False
        self.seq += 1
        buf = self.seq % 2
        self._slot(buf, self.rank, x).copy_(x)
        self.flags[self.rank] = self.seq
        self._wait_all()
        x.copy_(self._slot(buf, 0, x))
        for r in range(1, self.size):  # the same order on every rank: bit-identical sums, no temporaries
            x.add_(self._slot(buf, r, x))
        return True
