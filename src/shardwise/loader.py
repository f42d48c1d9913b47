"""From checkpoint bytes to a rank's tensors: spec -> plan -> boxes read into one arena.

The source may be an HF safetensors checkpoint or a shardwise sharded checkpoint saved
under any other layout; both answer ``read(box, dst)``, so loading and resharding are
the same code.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .comm import make_comm
from .flat import Buffer
from .layout import PROVIDERS, Layout, RankPlan, plan_rank
from .model import Model
from .progress import progress_bar
from .provider import Provider, Resident
from .reader import MANIFEST, Checkpoint
from .sharded import ShardedCheckpoint
from .spec import load_spec
from .zero3 import Zero3

log = logging.getLogger(__name__)
ALIGN = 64


@dataclass
class Weights:
    """One rank's tensors, what they are (the plan), the buffers they are views of, and where they came from."""

    plan: RankPlan
    tensors: dict[str, torch.Tensor]
    source_dtypes: dict[str, torch.dtype]
    source_dir: Path
    buffers: dict[str, torch.Tensor]

    def unique(self) -> dict[str, torch.Tensor]:
        """Local tensors with aliases (a tied embedding and LM head on one stage) listed once."""
        seen, out = set(), {}
        for name, t in self.tensors.items():
            if id(t) not in seen:
                seen.add(id(t))
                out[name] = t
        return out


def open_source(path: str | Path) -> Checkpoint | ShardedCheckpoint:
    path = Path(path)
    return ShardedCheckpoint(path) if (path / MANIFEST).exists() else Checkpoint(path)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cuda"`` means this rank's own GPU (LOCAL_RANK), so one call works on every rank."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


def arena(sizes: list[int], dtypes: list[torch.dtype], device: torch.device) -> list[torch.Tensor]:
    """Zeroed flat buffers of ``sizes`` elements, carved out of one allocation.

    On CPU the allocation is an anonymous mapping with MAP_POPULATE: the kernel faults in
    every page in one call instead of one fault per 4 KiB page on first write, which
    is the biggest cost of loading from the page cache after the copy itself.
    """
    nbytes = [n * d.itemsize for n, d in zip(sizes, dtypes)]
    offsets = [0]
    for n in nbytes:
        offsets.append(offsets[-1] + -(-n // ALIGN) * ALIGN)
    total = max(offsets[-1], ALIGN)
    if device.type == "cpu":
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        flat = torch.frombuffer(mmap.mmap(-1, total, flags=flags), dtype=torch.uint8)
    else:
        flat = torch.zeros(total, dtype=torch.uint8, device=device)
    return [flat[o : o + n].view(d) for o, n, d in zip(offsets, nbytes, dtypes)]


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


def load_weights(path: str | Path, layout: Layout | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", rank: int | None = None, progress: bool = True,
                 provider: str = "resident") -> Weights:
    """This rank's tensors under ``layout`` and ``provider``, from an HF or a sharded checkpoint.

    ``dtype=None`` keeps each tensor in the checkpoint's own dtype, so a reshard is
    bit-exact. Aliased tensors share one allocation and one read.
    """
    layout = layout or Layout()
    rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
    spec = load_spec(path)
    plan = plan_rank(spec, layout, rank, provider)
    with open_source(path) as source:
        source.check(spec)
        source_dtypes = {name: source.source_dtype(name) for name in spec.tensors()}
        dtypes = [dtype or buffer_dtype(b, plan, source_dtypes) for b in plan.buffers]
        flats = dict(zip((b.name for b in plan.buffers),
                         arena([b.numel for b in plan.buffers], dtypes, resolve_device(device))))
        tensors = views(plan, flats)
        unique = {id(t): name for name, t in tensors.items()}
        bar = progress_bar(unique.values(), progress and rank == 0, total=len(unique),
                           desc=f"rank {rank} loading", unit="tensor")
        for name in bar:
            for box in plan.tensors[name].boxes:
                source.read(box, tensors[name])
    return Weights(plan, tensors, source_dtypes, Path(path), flats)


def load_model(checkpoint_dir: str | Path, layout: Layout | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, progress: bool = True, provider: str = "resident",
               work_dtype: torch.dtype | None = None, prefetch: int = 1, offload: bool = False) -> Model:
    """Load this rank's part of a checkpoint (HF or sharded) under ``layout``; collective over the layout's world.

    ``provider="resident"`` keeps every work weight on the rank (DP replicas are plain
    data parallelism). ``provider="zero3"`` keeps 1/dp of each block in ``dtype`` (the
    master dtype) and gathers blocks on demand in ``work_dtype`` (None: the same;
    ``torch.float8_e4m3fn`` or ``torch.int8`` quantize the gather and compute in
    ``dtype``), ``prefetch`` blocks ahead, with the masters in host memory if ``offload``.

    The model holds process groups and shared memory: ``close()`` it, or use it as a
    context manager, when loading more than one per process.
    """
    layout = layout or Layout()
    device = resolve_device(device)
    check_provider_options(provider, dtype, work_dtype, prefetch, offload)
    comm = make_comm(layout, device)
    try:
        weights = load_weights(checkpoint_dir, layout, dtype, "cpu" if offload else device, comm.rank, progress,
                               provider)
        if provider == "zero3":
            source: Provider = Zero3(weights.plan, comm, weights.buffers, work_dtype, prefetch, offload, device)
        else:
            source = Resident(weights.plan, weights.tensors)
        model = Model(weights, comm, source, device)
    except BaseException:
        comm.close(sync=False)  # the peers may have failed too, or be stuck waiting: no barrier
        raise
    log.info("rank %d loaded %d tensors, %.1f MB", comm.rank, len(weights.tensors),
             weights.plan.nbytes(dtype) / 1e6)
    return model


WORK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8)


def check_provider_options(provider: str, dtype: torch.dtype, work_dtype: torch.dtype | None, prefetch: int,
                           offload: bool) -> None:
    """Refuse option combinations that mean nothing, before any rank loads a byte."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    if provider != "zero3" and (work_dtype is not None or offload):
        raise ValueError("work_dtype and offload need provider='zero3': resident weights are computed as loaded")
    if work_dtype is not None and work_dtype not in WORK_DTYPES:
        raise ValueError(f"work_dtype {work_dtype} is not one of {', '.join(map(str, WORK_DTYPES))}")
    if dtype not in WORK_DTYPES[:3]:
        raise ValueError(f"dtype {dtype} cannot hold masters or compute; use float32, bfloat16 or float16")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
