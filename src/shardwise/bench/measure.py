"""What every benchmark measures with: resident memory and its peak, barriers, one value from every rank, a
warm or a cold page cache."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import time
from pathlib import Path

import torch.distributed as dist

from ..io.reader import Checkpoint


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Peak resident memory growth over a block: resets the kernel's high-water mark on entry."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        self.growth = _status_kb("VmHWM") * 1024 - self.start


def bytes_read() -> int | None:
    """Bytes this process has read through system calls so far (``rchar`` of /proc/self/io: page-cache hits
    included), or None where the OS does not say."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def checkpoint_files(directory: str | Path) -> list[Path]:
    return sorted({e.path for e in Checkpoint(directory).entries.values()})


def warm_page_cache(directory: str | Path) -> None:
    """Read every file once so all measurements start from the page cache, as the targets specify."""
    for path in checkpoint_files(directory):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


RESIDENT_SLACK = 0.01


def drop_pages(directory: str | Path) -> str | None:
    """Evict the checkpoint's files from the page cache (``posix_fadvise(DONTNEED)``, which needs no privilege but
    keeps pages another process has mapped or dirtied); None once at most ``RESIDENT_SLACK`` of each file's pages
    are resident (a peer rank dropping the same file at once may touch a few), else why not."""
    if not hasattr(os, "posix_fadvise"):
        return "this OS has no posix_fadvise"
    for path in checkpoint_files(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        left = resident_fraction(path)
        if left > RESIDENT_SLACK:
            return f"{path}: {left:.1%} of its pages still resident after POSIX_FADV_DONTNEED"
    return None


def resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (``mincore`` over a private mapping, which reads nothing;
    0.0 where it cannot tell)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    if not size or not hasattr(libc, "mincore"):
        return 0.0
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mem:
        start = ctypes.c_char.from_buffer(mem)
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec)
        del start  # the buffer export must end before the mapping closes
    return 0.0 if failed else sum(b & 1 for b in vec) / pages


def sequential_read(directory: str | Path, chunk: int = 16 << 20) -> float:
    """Seconds one reader takes to read every byte of the checkpoint's files in order, in ``chunk`` reads into one
    buffer: the storage's floor for a load, cold if the pages were dropped first."""
    buf = memoryview(bytearray(chunk))
    t0 = time.perf_counter()
    for path in checkpoint_files(directory):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


_MB = 2**20


def all_ranks(value) -> list:
    """Every rank's ``value``, in rank order (a list of one without a process group)."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _release_freed_memory() -> None:
    """Collect garbage and hand the allocator's freed heap back to the kernel, so RSS is what is still alive."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then include freed heap of an earlier setting
        pass


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
