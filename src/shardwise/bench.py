"""Benchmarks run by ``shardwise bench``: each rank measures itself and rank 0 collects the rows.

Load is measured against two yardsticks in the same run: HF transformers'
``from_pretrained(tp_plan="auto")`` and a floor, the time to read the rank's share of
bytes from the page cache into a fresh buffer, which no loader can beat.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .hf_export import DEFAULT_FILE_BYTES
from .layout import Layout, plan_rank
from .loader import load_model
from .reader import Checkpoint
from .spec import load_spec
from .weights import arena


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


def source_bytes(directory: str | Path, layout: Layout, rank: int) -> int:
    """Bytes of checkpoint data a rank's boxes cover, in the checkpoint's own dtypes."""
    spec = load_spec(directory)
    entries = Checkpoint(directory).entries
    seen = set()
    total = 0
    for sharded in plan_rank(spec, layout, rank).tensors.values():
        for box in sharded.boxes:
            if box.region not in seen:
                seen.add(box.region)
                total += box.numel * entries[box.source].dtype.itemsize
    return total


def bench_load_rank(directory: str, tp: int, pp: int, dtype: torch.dtype, with_hf: bool) -> list[dict]:
    """Runs on every rank; returns every rank's row (on rank 0)."""
    layout = Layout(tp, pp)
    rank = dist.get_rank() if dist.is_initialized() else 0
    share = source_bytes(directory, layout, rank)
    row: dict = {"rank": rank, "tp": tp, "pp": pp, "dtype": str(dtype).removeprefix("torch."), "bytes": share}
    _barrier()
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        model = load_model(directory, layout, dtype=dtype, progress=False)
        row["load_s"] = time.perf_counter() - t0
        row["cpu_s"] = time.process_time() - c0  # apart from core contention when ranks outnumber cores
    row["shard_bytes"] = model.plan.nbytes(dtype)
    row["peak_rss_growth"] = mem.growth
    row["rss_ratio"] = mem.growth / row["shard_bytes"]
    model.close()
    _barrier()
    # Measured after the load, best of three: any one-time cost of the process falls on shardwise, not the floor.
    row["floor_s"] = min(read_floor(directory, share, rank) for _ in range(3))
    if with_hf:
        _barrier()
        row["hf_load_s"] = _hf_load_seconds(directory, dtype, tp * pp)
    rows = [None] * (tp * pp)
    if dist.is_initialized():
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    return rows


def _hf_load_seconds(directory: str, dtype: torch.dtype, world: int) -> float:
    import transformers

    t0 = time.perf_counter()
    kwargs = {"tp_plan": "auto"} if world > 1 else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    return seconds


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()



def bench_generate_rank(directory: str, tp: int, pp: int, prompt: str, new_tokens: int, with_hf: bool) -> dict:
    """Greedy fp32 throughput of shardwise and (optionally) HF tp_plan="auto", same prompt, exactly N new tokens."""
    from .text import TemplateError, Text

    text = Text(directory)
    try:
        ids = torch.tensor([text.prompt_ids(prompt, chat=True)])
    except TemplateError:  # a base model without a chat template gets the plain prompt
        ids = torch.tensor([text.prompt_ids(prompt, chat=False)])
    model = load_model(directory, Layout(tp, pp), progress=False)
    model.generate(ids, 2)  # warm-up: first-call allocations and thread pools
    _barrier()
    t0 = time.perf_counter()
    out = model.generate(ids, new_tokens)
    row = {"tp": tp, "pp": pp, "prompt_tokens": ids.shape[1], "new_tokens": new_tokens,
           "shardwise_tok_s": new_tokens / (time.perf_counter() - t0),
           "shardwise_text": text.decode(out[0, ids.shape[1] :].tolist())}
    model.close()
    if with_hf:
        row |= _hf_generate(directory, ids, new_tokens, tp * pp, text)
    return row


def _hf_generate(directory: str, ids: torch.Tensor, new_tokens: int, world: int, text) -> dict:
    import transformers

    kwargs = {"tp_plan": "auto"} if world > 1 else {}
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
        model.generate(ids, **settings | {"max_new_tokens": 2, "min_new_tokens": 2})
        _barrier()
        t0 = time.perf_counter()
        out = model.generate(ids, **settings)
        seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - HF failing on a layout is itself a result worth reporting
        return {"hf_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {"hf_tok_s": new_tokens / seconds, "hf_text": text.decode(out[0, ids.shape[1] :].tolist())}


def bench_export_rank(directory: str, tp: int, work: str) -> dict:
    """Export from TP=tp against one sequential write of the same bytes, and a reshard to another layout.

    Every timed phase starts after ``os.sync()``, so none pays for the previous one's writeback.
    """
    from .hf_export import export
    from .loader import load_weights
    from .sharded import save_sharded

    work_dir = Path(work)
    rank = dist.get_rank() if dist.is_initialized() else 0
    weights = load_weights(directory, Layout(tp), progress=False)
    row: dict = {"tp": tp}

    def timed(key: str, fn, *args) -> None:
        os.sync()
        _barrier()
        t0 = time.perf_counter()
        fn(*args)
        row[key] = time.perf_counter() - t0
        _barrier()

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
