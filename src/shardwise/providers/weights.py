"""A rank's tensors in memory: zeroed buffers carved from one allocation, and named views of them.

The plan says which buffers a rank holds and which tensors are views of them (see
``flat``); this module only allocates them. Loading fills them from a checkpoint,
``init`` from a seeded generator; either way the result is a ``Weights``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..plan.boxes import round_up
from ..plan.flat import Buffer
from ..plan.rank import RankPlan

ALIGN = 64


@dataclass
class Weights:
    """One rank's tensors, what they are (the plan), the buffers they are views of, and where they came from."""

    plan: RankPlan
    tensors: dict[str, torch.Tensor]
    source_dtypes: dict[str, torch.dtype]
    source_dir: Path | None  # where the config and tokenizer came from; None for weights made from a bare spec
    buffers: dict[str, torch.Tensor]
    int8_head: bool | None = None  # int8 weight-only (the projections int8): whether the LM head is too; None: not

    @property
    def sources(self) -> list[Path]:
        """Directories a write must never land in."""
        return [] if self.source_dir is None else [self.source_dir]

    def unique(self) -> dict[str, torch.Tensor]:
        """Local tensors with aliases (a tied embedding and LM head on one stage) listed once."""
        seen, out = set(), {}
        for name, t in self.tensors.items():
            if id(t) not in seen:
                seen.add(id(t))
                out[name] = t
        return out


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cuda"`` means this rank's own GPU (LOCAL_RANK), so one call works on every rank."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


def page_locked(nbytes: int) -> torch.Tensor:
    """Zeroed page-locked host memory, which an accelerator copies to and from asynchronously."""
    return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)


def arena(sizes: list[int], dtypes: list[torch.dtype], device: torch.device, pinned: bool = False,
          populate: bool = True) -> list[torch.Tensor]:
    """Zeroed flat buffers of ``sizes`` elements, carved out of one allocation (``page_locked`` if ``pinned``).

    On CPU the allocation is an anonymous mapping with MAP_POPULATE: the kernel faults in
    every page in one call instead of one fault per 4 KiB page on first write, which
    is the biggest cost of loading from the page cache after the copy itself. Without
    ``populate`` the pages are left to ``populated_behind`` (or to first touch).
    """
    nbytes = [n * d.itemsize for n, d in zip(sizes, dtypes)]
    offsets = [0]
    for n in nbytes:
        offsets.append(offsets[-1] + round_up(n, ALIGN))
    total = max(offsets[-1], ALIGN)
    if pinned:
        if device.type != "cpu":
            raise ValueError(f"page-locked memory is host memory: asked for on {device}")
        flat = page_locked(total)
    elif device.type == "cpu":
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        flat = torch.frombuffer(mmap.mmap(-1, total, flags=flags), dtype=torch.uint8)
    else:
        flat = torch.zeros(total, dtype=torch.uint8, device=device)
    return [flat[o : o + n].view(d) for o, n, d in zip(offsets, nbytes, dtypes)]


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14 on; Python < 3.13 does not name it
POPULATE_STEP = 4 << 20


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _madvise(start: int, length: int, advice: int) -> bool:
    """madvise(2) on a raw address range; ctypes lets go of the GIL during the call."""
    return _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0


@functools.cache
def can_populate_behind() -> bool:
    """Whether this kernel faults pages in on request (MADV_POPULATE_WRITE: Linux 5.14 on), tried once on a page.
    Where it cannot, an arena to be filled is populated up front instead (MAP_POPULATE), never left to fault page by
    page on first touch."""
    if not sys.platform.startswith("linux"):
        return False
    probe = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        return _madvise(torch.frombuffer(probe, dtype=torch.uint8).data_ptr(), mmap.PAGESIZE, MADV_POPULATE_WRITE)
    finally:
        probe.close()


@contextlib.contextmanager
def populated_behind(buffers: list[torch.Tensor]) -> Iterator[None]:
    """Fault in the pages of one lazily mapped arena's buffers (``allocate(..., populate=False)``) on a thread, while
    the caller fills them.

    A cold load waits on the disk; populating every page before the first read, as MAP_POPULATE
    does, adds the kernel's zeroing of them to the reads' time (0.15-0.2 s of a 0.8 s load of
    349 MB per rank on the benchmark VM), where on a thread it runs while the reads wait. It goes
    in 4 MiB steps, so the address-space lock the kernel holds while populating is let go often
    and the reader's own faults and mappings pass; a page the reader touched first is left as it
    is. Leaving waits for the thread, so every page is present afterwards, as with MAP_POPULATE;
    leaving by an exception stops it at its next step instead.
    """
    cpu = [b for b in buffers if b.device.type == "cpu" and b.nbytes]
    if not cpu or not can_populate_behind():
        yield
        return
    if len({b.untyped_storage().data_ptr() for b in cpu}) != 1:
        raise ValueError("populated_behind: the buffers are not views of one arena")
    start = min(b.data_ptr() for b in cpu)
    end = max(b.data_ptr() + b.nbytes for b in cpu)
    stop = threading.Event()

    def populate() -> None:
        for at in range(start // mmap.PAGESIZE * mmap.PAGESIZE, end, POPULATE_STEP):
            if stop.is_set() or not _madvise(at, min(POPULATE_STEP, end - at), MADV_POPULATE_WRITE):
                return

    worker = threading.Thread(target=populate, name="shardwise-populate")
    worker.start()
    try:
        yield
    except BaseException:
        stop.set()
        raise
    finally:
        worker.join()


def release_pages(t: torch.Tensor) -> None:
    """Give the kernel back the whole pages of a CPU tensor's memory (``MADV_DONTNEED``) once its contents live
    elsewhere: an owner's series layer moved to shared memory would otherwise keep its arena pages resident for as
    long as the arena lives. Only pages wholly inside the tensor are dropped, so its neighbours keep theirs; a
    later read of the dropped range sees zeros, so nothing may read ``t`` again."""
    if t.device.type != "cpu" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    lo, hi = round_up(t.data_ptr(), page), (t.data_ptr() + t.nbytes) // page * page
    if hi > lo:
        _madvise(lo, hi - lo, mmap.MADV_DONTNEED)


def buffer_dtype(buffer: Buffer, plan: RankPlan, source_dtypes: dict[str, torch.dtype]) -> torch.dtype:
    """The checkpoint's own dtype for a buffer's tensors; a ZeRO-3 chunk mixing several takes the widest."""
    found = [source_dtypes[box.source] for v in buffer.views for box in plan.tensors[v.name].boxes]
    return functools.reduce(torch.promote_types, found) if found else torch.float32


def views(plan: RankPlan, flats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every held tensor as a view of its buffer; names placed alike (aliases) get the very same tensor."""
    out, made = {}, {}
    for buffer in plan.buffers:
        flat = flats[buffer.name]
        for v in buffer.views:
            key = (buffer.name, v.offset, v.shape)
            if key not in made:
                made[key] = flat[v.offset : v.offset + v.numel].view(v.shape)
            out[v.name] = made[key]
    return out


def span(buffers: list[torch.Tensor]) -> torch.Tensor:
    """The arena memory from the first of ``buffers`` to the end of the last, as one tensor of their dtype.

    ``arena`` carves buffers in plan order, so the buffers of one block are adjacent and
    one collective can move them all (the alignment gaps between them stay zero).
    """
    first, last = buffers[0], buffers[-1]
    storage, size = first.untyped_storage(), first.element_size()
    offset = (first.data_ptr() - storage.data_ptr()) // size
    numel = (last.data_ptr() + last.nbytes - first.data_ptr()) // size
    return first.new_empty(0).set_(storage, offset, (numel,))


def allocate(plan: RankPlan, dtypes: list[torch.dtype], device: torch.device, pinned: bool = False,
             populate: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The plan's buffers (``dtypes`` in plan order, page-locked host memory if ``pinned``, faulted in now unless
    ``populate`` is off) and every held tensor as a view of them."""
    sizes = [b.numel for b in plan.buffers]
    flats = dict(zip((b.name for b in plan.buffers), arena(sizes, dtypes, device, pinned, populate)))
    return flats, views(plan, flats)


def pinned(weights: Weights) -> Weights:
    """The same weights in page-locked host memory, whose copies to an accelerator can run asynchronously.

    Views are rebuilt over the pinned buffers, so what an optimizer updates is what
    ``export`` and ``save_sharded`` write.
    """
    buffers = {name: t.pin_memory() for name, t in weights.buffers.items()}
    return dataclasses.replace(weights, buffers=buffers, tensors=views(weights.plan, buffers))
