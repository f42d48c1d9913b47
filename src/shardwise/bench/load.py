"""``shardwise bench load``: each rank's load time, bytes and peak RSS growth.

Load is measured against two yardsticks in the same run: HF transformers'
``from_pretrained(tp_plan="auto")`` and a floor, the time to read the rank's share of
bytes from the page cache into a fresh buffer, which no loader can beat.
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..io.loader import Provide, load_model
from ..io.reader import Checkpoint
from ..plan.boxes import first_holders
from ..plan.mesh import Layout
from ..plan.rank import plan_rank
from ..plan.series import Series
from ..plan.spec import load_spec
from ..providers.weights import arena
from .measure import PeakRSS, barrier, bytes_read, checkpoint_files, drop_pages, sequential_read


def read_floor(directory: str | Path, nbytes: int, rank: int) -> float:
    """Seconds to read ``nbytes`` of the checkpoint from the page cache into a fresh buffer.

    The buffer gets the same prefaulted allocation the loader uses, so the floor is as
    fast as reading can be; the loader is never flattered by a slow yardstick.
    """
    files = checkpoint_files(directory)
    total = sum(p.stat().st_size for p in files)
    start = (rank * nbytes) % max(1, total - nbytes)
    t0 = time.perf_counter()
    buf = memoryview(arena([nbytes], [torch.uint8], torch.device("cpu"))[0].numpy())
    done = 0
    for path in files:
        size = path.stat().st_size
        if start >= size:
            start -= size
            continue
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            while done < nbytes:
                got = f.readinto(buf[done:])
                if not got:
                    break
                done += got
        start = 0
        if done == nbytes:
            break
    return time.perf_counter() - t0


def source_bytes(directory: str | Path, layout: Layout, rank: int, provider: str = "resident",
                 series: tuple[Series, ...] = ()) -> int:
    """Bytes of checkpoint data a rank's boxes cover, in the checkpoint's own dtypes."""
    spec = load_spec(directory)
    entries = Checkpoint(directory).entries
    held = ((None, box) for t in plan_rank(spec, layout, rank, provider, series).tensors.values() for box in t.boxes)
    return sum(box.numel * entries[box.source].dtype.itemsize for _, box in first_holders(held))


def bench_load_rank(directory: str, layout: Layout, dtype: torch.dtype, with_hf: bool,
                    provide: Provide | None = None, cold: bool = False) -> list[dict]:
    """Runs on every rank; returns every rank's row (on rank 0). HF's load is timed only for a TP-only layout.

    ``cold``: the checkpoint's pages are dropped before the load. The storage's floor, one
    sequential read of every byte by rank 0 while the other ranks wait, also from a dropped
    cache, is timed just before the load and just after it: this disk's pace drifts by 2x
    within minutes, so ``sequential_read_s`` is the mean of the two reads that bracket the load
    (both are in ``sequential_reads_s``). ``cold`` in the row says why the pages could not be
    dropped, if they could not (then every figure is a warm one)."""
    provide = provide or Provide()
    rank = dist.get_rank() if dist.is_initialized() else 0
    share = source_bytes(directory, layout, rank, provide.provider, provide.series)
    row: dict = {"rank": rank, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep,
                 "provider": provide.provider, "dtype": str(dtype).removeprefix("torch."), "bytes": share}
    if layout.ep > 1:  # what this rank would read if it read every routed expert, as a loader without EP does
        whole, (stage, d, _, t) = replace(layout, ep=1), layout.position(rank)
        row["every_expert_bytes"] = source_bytes(directory, whole, whole.rank_of(stage, d, 0, t), provide.provider,
                                                 provide.series)
    if cold:
        before = _cold_read(directory, rank)
        row["cold"] = _drop_everywhere(directory)
    else:
        barrier()
    with PeakRSS() as mem:
        t0, c0, r0 = time.perf_counter(), time.process_time(), bytes_read()
        model = load_model(directory, layout, dtype=dtype, progress=False, **vars(provide))
        row["load_s"] = time.perf_counter() - t0
        row["cpu_s"] = time.process_time() - c0  # apart from core contention when ranks outnumber cores
        if r0 is not None:
            row["read_bytes"] = bytes_read() - r0
    row["shard_bytes"] = model.plan.nbytes(dtype)
    row["peak_rss_growth"] = mem.growth
    row["rss_ratio"] = mem.growth / row["shard_bytes"]
    model.close()
    barrier()
    if cold:
        after = _cold_read(directory, rank)
        row["cold"] = row["cold"] or before[1] or after[1]
        if rank == 0:
            row["sequential_reads_s"] = [before[0], after[0]]
            row["sequential_read_s"] = (before[0] + after[0]) / 2
    # Measured after the load, best of three: any one-time cost of the process falls on shardwise, not the floor.
    row["floor_s"] = min(read_floor(directory, share, rank) for _ in range(3))
    if with_hf and layout.world_size == layout.tp:
        barrier()
        row["hf_load_s"] = _hf_load_seconds(directory, dtype, layout.tp)
    rows = [None] * layout.world_size
    if dist.is_initialized():
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    return rows


def _cold_read(directory: str, rank: int) -> tuple[float, str | None]:
    """Rank 0's seconds for one sequential read of the checkpoint from a dropped page cache (the others wait), and
    why the pages could not be dropped, if they could not."""
    failed = _drop_everywhere(directory)
    seconds = sequential_read(directory) if rank == 0 else 0.0
    barrier()
    return seconds, failed


def _drop_everywhere(directory: str) -> str | None:
    """Drop the checkpoint's pages on every rank (each host has its own page cache), then line the ranks up."""
    barrier()
    failed = drop_pages(directory)
    barrier()
    return failed


def _hf_load_seconds(directory: str, dtype: torch.dtype, world: int) -> float:
    import transformers

    t0 = time.perf_counter()
    kwargs = {"tp_plan": "auto"} if world > 1 else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    return seconds
