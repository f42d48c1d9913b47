"""What every benchmark measures with: resident memory and its peak, barriers, one value from every rank, a
warm page cache."""

from __future__ import annotations

import gc
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
