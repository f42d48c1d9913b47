"""``shardwise bench export``: the parallel HF export against two floors, one sequential write of the same bytes
and every rank writing its share of them to a file of its own at once, and the times of a sharded save and a
reshard."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..io.hf_export import DEFAULT_FILE_BYTES
from ..plan.mesh import Layout
from .measure import barrier


def bench_export_rank(directory: str, tp: int, work: str) -> dict:
    """Export from TP=tp against one sequential write of the same bytes and the ranks' parallel raw write of their
    shares, and a reshard to another layout.

    Every timed phase starts after ``os.sync()``, so none pays for the previous one's writeback.
    """
    from ..io.hf_export import export
    from ..io.loader import load_weights
    from ..io.sharded import save_sharded

    work_dir = Path(work)
    rank = dist.get_rank() if dist.is_initialized() else 0
    weights = load_weights(directory, Layout(tp), progress=False)
    row: dict = {"tp": tp}

    share = sum(box.numel * weights.source_dtypes[box.source].itemsize for _, box in weights.plan.owned())
    # Untimed: on a VM the first large write after start-up runs at a fraction of the disk's pace (the host backing
    # the guest's fresh page-cache pages, measured 0.56-1.77 s against 0.1 s for the same bytes written next), and
    # would be charged to whichever phase came first.
    raw_write(work_dir / f"warmup{rank}.bin", share)
    (work_dir / f"warmup{rank}.bin").unlink()

    def timed(key: str, fn, *args) -> None:
        os.sync()
        barrier()
        t0 = time.perf_counter()
        fn(*args)
        row[key] = time.perf_counter() - t0
        barrier()

    timed("parallel_write_s", raw_write, work_dir / f"rank{rank}.bin", share)  # first: the floor at its best
    (work_dir / f"rank{rank}.bin").unlink()
    timed("export_s", export, weights, work_dir / "hf", DEFAULT_FILE_BYTES, False)
    row["bytes"] = sum(p.stat().st_size for p in (work_dir / "hf").glob("*.safetensors"))
    if rank == 0:
        timed("sequential_write_s", sequential_write, work_dir / "sequential.bin", row["bytes"])
    else:
        timed("sequential_write_s", lambda: None)
    timed("save_sharded_s", save_sharded, weights, work_dir / "sharded")
    del weights
    target = Layout(1, tp)  # same ranks, a wholly different split: TP=N becomes PP=N
    timed("reshard_s", lambda: save_sharded(load_weights(work_dir / "sharded", target, progress=False),
                                            work_dir / "resharded"))
    row["reshard_to"] = f"tp={target.tp} pp={target.pp}"
    return row


def raw_write(path: Path, nbytes: int, chunk: int = 64 << 20) -> None:
    """Write ``nbytes`` to a new file with ``pwrite`` at explicit offsets and fsync it: what a rank exporting its
    share writes, without the format."""
    buf = memoryview(torch.randint(0, 255, (min(chunk, nbytes) or 1,), dtype=torch.uint8).numpy())
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        at = 0
        while at < nbytes:
            at += os.pwrite(fd, buf[: min(nbytes - at, len(buf))], at)
        os.fsync(fd)
    finally:
        os.close(fd)


def sequential_write(path: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    """Seconds for one process to write ``nbytes`` to a new file and fsync it, as an export also does."""
    buf = memoryview(torch.randint(0, 255, (min(chunk, nbytes),), dtype=torch.uint8).numpy())
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left:
            left -= f.write(buf[: min(left, len(buf))])
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds
