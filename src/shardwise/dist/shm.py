"""Collectives through shared memory for ranks on one host: the CPU fast path of decoding and of TP training.

Token-by-token decoding sends a few kilobytes per collective, so its speed is set by
latency, and gloo's loopback TCP costs 1-3 ms per all-reduce, which is most of the time
of a decode step. Training moves megabytes (a sequence's activations), where gloo's
all-gather and reduce-scatter cost as much as its all-reduce (11.6, 12.8 and 10.8 ms for
8 MB), while here they cost what copying their bytes costs. Each rank copies its tensor
into its slot of a shared segment, raises its sequence flag, waits for every flag, and
reads (or sums, in rank order, so every rank gets bit-identical results) the slots.
Slots are double-buffered: a rank can only write step n+2 after all ranks have passed
step n+1, by which time every rank has finished reading step n.

The EP ranks' all-to-all (``ShmAllToAll``) follows the same protocol: each rank writes its
rows, in destination order, behind a header of its send counts, and reads the rows meant
for it out of every slot. A sparse layer makes four per step, and through gloo they took 15 ms
of a 40 ms decode step at EP 2 (docs/benchmarks.md).

The flag protocol relies on x86's total store order (data stores become visible
before the flag store), so it is used only on x86-64; elsewhere gloo serves.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import platform
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("shardwise.shm")  # the name its log lines have always carried

FLAG_STRIDE = 8  # int64s per flag: one 64-byte cache line each, so ranks never share a line
CAPACITY = 4 << 20  # bytes per slot: larger tensors go in rounds (the all-to-all's through gloo)
HEADER = 4096  # bytes ahead of an all-to-all slot's rows: whether they were written, the send counts, run counts
SEGMENT_DIR = "/dev/shm"  # tests point one rank elsewhere to play a container with a /dev/shm of its own
TOKEN_BYTES = 16


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and os.environ.get("SHARDWISE_SHM", "1") != "0"


def segment_bytes(size: int) -> int:
    return size * FLAG_STRIDE * 8 + 2 * size * CAPACITY


def attach(group: dist.ProcessGroup, ranks: list[int], timeout: float) -> ShmCollectives | None:
    """The group's shared-memory collectives, or None (gloo) unless every rank proved it maps the same segment."""
    mem = share(group, ranks, segment_bytes(len(ranks)), "collectives")
    return None if mem is None else ShmCollectives(mem, ranks.index(dist.get_rank()), len(ranks), timeout, ranks)


def attach_all_to_all(group: dist.ProcessGroup, ranks: list[int], timeout: float) -> ShmAllToAll | None:
    """The group's shared-memory all-to-all, or None (gloo), decided as ``attach`` decides."""
    if len(ranks) > HEADER // 8 - 2:
        return None
    mem = share(group, ranks, segment_bytes(len(ranks)), "all-to-all")
    return None if mem is None else ShmAllToAll(mem, ranks.index(dist.get_rank()), len(ranks), timeout, ranks)


def share(group: dist.ProcessGroup, ranks: list[int], total: int, what: str) -> mmap.mmap | None:
    """A segment of ``total`` bytes every rank of the group maps, or None (gloo) unless every rank proved it does.

    Hostnames cannot tell: containers on host networking share one without sharing
    /dev/shm. So rank 0 creates the segment and writes a random token at its end,
    every other rank maps it by name and reads the token back, and the outcomes are
    gathered before anyone uses it, so the whole group decides alike: shared memory
    everywhere, or gloo everywhere with one warning that says which rank failed how.
    """
    size, me = len(ranks), ranks.index(dist.get_rank())
    if not all(_gather(group, size, supported())):
        return None  # SHARDWISE_SHM=0 or not x86-64 somewhere: a setting, not a failure
    mem, error = None, None
    offer: list[Any] = [None]
    if me == 0:
        name, token = f"shardwise-{uuid.uuid4().hex}", os.urandom(TOKEN_BYTES)
        mem, error = _try(_create, os.path.join(SEGMENT_DIR, name), token, total)
        offer = [(name, token, error)]
    dist.broadcast_object_list(offer, src=ranks[0], group=group)
    name, token, created_error = offer[0]
    path = os.path.join(SEGMENT_DIR, name)  # each rank's own /dev/shm: the same one only if the probe says so
    try:
        if me != 0 and created_error is None:
            mem, error = _try(_open, path, token, total)
        errors = _gather(group, size, error)
    finally:
        if me == 0 and created_error is None:  # once all have mapped it (or failed, or died): nothing can leak
            os.unlink(path)
    if any(errors):
        if mem is not None:
            mem.close()
        if me == 0:
            failed = "; ".join(f"rank {ranks[i]}: {e}" for i, e in enumerate(errors) if e)
            log.warning("rank %d: no shared-memory %s for ranks %s, using gloo (%s)", ranks[0], what, ranks, failed)
        return None
    return mem


def _gather(group: dist.ProcessGroup, size: int, value: Any) -> list[Any]:
    out: list[Any] = [None] * size
    dist.all_gather_object(out, value, group=group)
    return out


def _try(step: Callable[..., mmap.mmap], *args: Any) -> tuple[mmap.mmap | None, str | None]:
    """Run a creating or opening step; its OSError becomes the text that the group's warning shows."""
    try:
        return step(*args), None
    except OSError as e:
        return None, str(e)


def _create(path: str, token: bytes, total: int) -> mmap.mmap:
    """Rank 0's new segment, its pages reserved now: a full /dev/shm fails here instead of SIGBUS mid-run."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, total)
        mem = mmap.mmap(fd, total)
    except OSError as e:
        os.unlink(path)
        raise OSError(e.errno, f"cannot create a {total / 2**20:.1f} MiB segment {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    mem[-TOKEN_BYTES:] = token
    return mem


def _open(path: str, token: bytes, total: int) -> mmap.mmap:
    """Map rank 0's segment by name; its token read back proves it is the same memory, not a namesake."""
    fd = os.open(path, os.O_RDWR)
    try:
        found = os.fstat(fd).st_size
        if found != total:  # mapping past the end of a shorter file would SIGBUS on the token read
            raise OSError(f"{path} holds {found} bytes, not the {total} rank 0 reserved")
        mem = mmap.mmap(fd, total)
    finally:
        os.close(fd)
    if mem[-TOKEN_BYTES:] != token:
        mem.close()
        raise OSError(f"{path} is not the segment rank 0 created (its token differs)")
    return mem


def timeout_seconds() -> float:
    """How long a rank waits for a peer before calling it dead: ``launch`` sets it for every rank."""
    return float(os.environ.get("SHARDWISE_TIMEOUT", 1800))


def wait_for(flags: np.ndarray, target: int, timeout: float, who: str, ranks: list[int] | None = None,
             failed: Callable[[], list[int]] | None = None) -> None:
    """Spin until every rank's flag reaches ``target``; a peer that never does is a TimeoutError naming it
    (by its global rank, when ``ranks`` maps flag positions to them).

    ``failed``, asked now and then, names the peers that gave up part-way through a transfer: waiting for
    them would last the whole timeout, so the wait ends at once with a RuntimeError naming them.
    """
    spins, deadline = 0, None
    while int(flags.min()) < target:
        spins += 1
        if failed is not None and spins % 64 == 0 and (gone := failed()):
            raise RuntimeError(f"{who} {gone} failed part-way through a transfer and left it: stopping instead of "
                               "waiting for them (their own error says why)")
        if spins > 64:
            os.sched_yield()  # ranks may outnumber cores: let the laggard run
        if spins % 4096 == 0:
            deadline = deadline or time.monotonic() + timeout
            if time.monotonic() > deadline:
                late = [(ranks or range(len(flags)))[r] for r in range(len(flags)) if flags[r] < target]
                raise TimeoutError(f"{who} {late} did not arrive within {timeout:.0f}s (dead peer?)")


class _Slots:
    """A group's segment: one sequence flag per rank, then two buffers of a ``CAPACITY`` slot per rank."""

    def __init__(self, mem: mmap.mmap, rank: int, size: int, timeout: float, ranks: list[int] | None = None):
        self.mem, self.rank, self.size, self.timeout = mem, rank, size, timeout
        self.ranks = ranks  # the group's global ranks, which a timeout names
        self.seq, self.capacity = 0, CAPACITY  # the capacity the segment was made with
        self.flags = np.ndarray((size * FLAG_STRIDE,), dtype=np.int64, buffer=mem)[::FLAG_STRIDE]
        self.data = torch.frombuffer(mem, dtype=torch.uint8, offset=size * FLAG_STRIDE * 8)

    def _bytes(self, buf: int, rank: int) -> torch.Tensor:
        """Rank ``rank``'s slot of buffer ``buf``."""
        start = (buf * self.size + rank) * self.capacity
        return self.data[start: start + self.capacity]

    def close(self) -> None:
        """Unmap the segment; the views go first, since mmap.close() raises BufferError while they export it."""
        del self.flags, self.data
        self.mem.close()


class ShmCollectives(_Slots):
    """All-reduce, all-gather and reduce-scatter over the group through the segment's slots.

    Tensors of any size go in rounds of one slot each (``CAPACITY`` bytes per rank): every
    rank writes the round's part of what it sends, raises its flag, waits for every flag,
    and reads from the others' slots what it needs of that round. Sums add the slots in
    rank order, so every rank that computes an element computes the same bits. Off the CPU
    each call returns False (nothing done) and the caller uses the backend, alike on every
    rank.
    """

    def all_reduce(self, x: torch.Tensor) -> bool:
        """Sum ``x`` over the group, in place."""
        if x.device.type != "cpu" or not x.is_contiguous():
            return False
        flat = x.view(-1)
        for start, stop in self._rounds(flat.numel(), flat.element_size()):
            slots = self._exchange(flat[start:stop])
            chunk = flat[start:stop]
            chunk.copy_(slots[0][: stop - start])
            for slot in slots[1:]:  # the same order on every rank: bit-identical sums, no temporaries
                chunk.add_(slot[: stop - start])
        return True

    def all_gather(self, parts: list[torch.Tensor], x: torch.Tensor) -> bool:
        """Every rank's ``x`` into ``parts[rank]`` (contiguous, shaped as that rank's piece)."""
        if x.device.type != "cpu":
            return False
        mine = x.contiguous().view(-1)
        flats = [p.view(-1) for p in parts]
        for start, stop in self._rounds(max(p.numel() for p in flats), mine.element_size()):
            slots = self._exchange(mine[start:stop])
            for flat, slot in zip(flats, slots):
                n = max(0, min(stop, flat.numel()) - start)
                flat[start: start + n].copy_(slot[:n])
        return True

    def reduce_scatter(self, out: torch.Tensor, x: torch.Tensor, starts: list[int]) -> bool:
        """The group's sum of elements ``starts[rank]`` on of flat ``x`` (as many as ``out`` holds) into ``out``;
        every rank sends all of its ``x`` but its own part, each rank's part at ``starts[r]``, so each moves the
        bytes a reduce-scatter's floor moves: the others' parts out, its own part from every other rank in."""
        if x.device.type != "cpu":
            return False
        send, into = x.contiguous().view(-1), out.view(-1)
        lo, hi = starts[self.rank], starts[self.rank] + into.numel()
        for start, stop in self._rounds(send.numel(), send.element_size()):
            a, b = max(lo, start), min(hi, stop)
            slots = self._exchange(send[start:stop], (a - start, b - start) if a < b else None)
            if a < b:
                terms = [send[a:b] if r == self.rank else slot[a - start: b - start] for r, slot in enumerate(slots)]
                chunk = into[a - lo: b - lo]
                chunk.copy_(terms[0])
                for term in terms[1:]:
                    chunk.add_(term)
        return True

    def _rounds(self, numel: int, itemsize: int) -> list[tuple[int, int]]:
        """The element ranges of the rounds that move ``numel`` elements (at least one round: every rank takes part
        in every call, whatever it holds)."""
        step = self.capacity // itemsize
        return [(start, min(start + step, numel)) for start in range(0, max(numel, 1), step)]

    def _exchange(self, send: torch.Tensor, hole: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """Write ``send`` (one round's elements, but for the ``hole`` range no one reads) into this rank's slot, wait
        for every rank, and return every rank's slot of the round as elements of ``send``'s dtype, in rank order."""
        self.seq += 1
        buf = self.seq % 2
        mine = self._bytes(buf, self.rank).view(send.dtype)
        a, b = hole or (send.numel(), send.numel())
        mine[:a].copy_(send[:a])
        mine[b: send.numel()].copy_(send[b:])
        self.flags[self.rank] = self.seq
        wait_for(self.flags, self.seq, self.timeout, "shared-memory collective: ranks", self.ranks)
        return [self._bytes(buf, r).view(send.dtype) for r in range(self.size)]



def run_totals(counts: list[int], widths: list[int]) -> list[int]:
    """The rows for each rank of ``counts`` runs of rows, ``widths[r]`` consecutive runs for rank r."""
    ends = [sum(widths[:r]) for r in range(len(widths) + 1)]
    return [sum(counts[a:b]) for a, b in zip(ends[:-1], ends[1:])]


class ShmAllToAll(_Slots):
    """``all_to_all_single`` of rows over the group, through the segment's slots.

    A slot holds a header, then the rank's rows in destination order. The header says
    whether the rows fit, how many go to each rank, and optionally per-destination counts
    of the caller's own (``split``: the rows per expert, each rank's experts in turn), so
    the receivers size their buffers and group the rows from the headers alone: one wait
    per exchange where counts-then-rows would take two.
    """

    buf = 0  # the buffer of the latest exchange, which ``_read`` reads

    def __call__(self, out: torch.Tensor, x: torch.Tensor, receive: list[int], send: list[int]) -> bool:
        """Rows ``x`` (``send[r]`` for rank r, in rank order) out, ``receive[r]`` rows from rank r into ``out``;
        False (nothing done, on every rank alike) when any rank's rows do not fit its slot, or off the CPU."""
        heads = self._post(x, send, [])
        if heads is None:
            return False
        sent = [h[1: 1 + self.size][self.rank] for h in heads]
        if sent != receive:
            raise RuntimeError(f"shared-memory all-to-all: EP ranks send this rank {sent} rows, it expected {receive}")
        self._read(out, heads)
        return True

    def split(self, x: torch.Tensor, counts: list[int], widths: list[int]
              ) -> tuple[torch.Tensor, list[list[int]]] | None:
        """Rows ``x`` out in ``counts`` runs (``widths[r]`` runs for rank r, in rank order), and back the rows for
        this rank with each sender's runs for it, ``[sender][run]``; None (nothing done, on every rank alike) when
        any rank's rows or counts do not fit, or off the CPU."""
        heads = self._post(x, run_totals(counts, widths), counts)
        if heads is None:
            return None
        first = 2 + self.size + sum(widths[: self.rank])
        runs = [h[first: first + widths[self.rank]] for h in heads]
        out = x.new_empty((sum(map(sum, runs)), *x.shape[1:]))
        self._read(out, heads)
        return out, runs

    def _post(self, x: torch.Tensor, send: list[int], counts: list[int]) -> list[list[int]] | None:
        """Write this rank's header and rows, wait for every rank's, and return the headers (None: something did not
        fit somewhere, so the caller falls back to gloo on every rank alike)."""
        if x.device.type != "cpu":
            return None
        self.seq += 1
        self.buf = self.seq % 2
        mine = self._bytes(self.buf, self.rank)
        head = mine[:HEADER].view(torch.int64)
        rows = x.contiguous().view(-1).view(torch.uint8)
        fits = HEADER + rows.numel() <= self.capacity and 2 + self.size + len(counts) <= HEADER // 8
        if fits:
            head[1: 2 + self.size + len(counts)] = torch.tensor([*send, len(counts), *counts], dtype=torch.int64)
            mine[HEADER: HEADER + rows.numel()].copy_(rows)
        head[0] = int(fits)
        self.flags[self.rank] = self.seq
        wait_for(self.flags, self.seq, self.timeout, "shared-memory all-to-all: EP ranks", self.ranks)
        heads = [self._bytes(self.buf, r)[:HEADER].view(torch.int64) for r in range(self.size)]
        if not all(int(h[0]) for h in heads):
            return None
        return [h[: 2 + self.size + int(h[1 + self.size])].tolist() for h in heads]

    def _read(self, out: torch.Tensor, heads: list[list[int]]) -> None:
        """Copy the rows each rank wrote for this one into ``out``, in rank order."""
        width = math.prod(out.shape[1:]) * out.element_size()  # bytes per row
        into, at = out.view(-1).view(torch.uint8), 0
        for r, h in enumerate(heads):
            sent = h[1: 1 + self.size]
            start, n = HEADER + sum(sent[: self.rank]) * width, sent[self.rank] * width
            into[at: at + n].copy_(self._bytes(self.buf, r)[start: start + n])
            at += n
