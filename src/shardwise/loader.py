"""From checkpoint bytes to a rank's tensors: spec -> plan -> boxes read into one arena.

The source may be an HF safetensors checkpoint or a shardwise sharded checkpoint saved
under any other layout; both answer ``read(box, dst)``, so loading and resharding are
the same code.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .comm import make_comm
from .layout import Layout, RankPlan, plan_rank
from .model import Model
from .progress import progress_bar
from .reader import MANIFEST, Checkpoint
from .sharded import ShardedCheckpoint
from .spec import load_spec

log = logging.getLogger(__name__)
ALIGN = 64


@dataclass
class Weights:
    """One rank's tensors, what they are (the plan) and where they came from."""

    plan: RankPlan
    tensors: dict[str, torch.Tensor]
    source_dtypes: dict[str, torch.dtype]
    source_dir: Path

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


def arena(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype], device: torch.device) -> list[torch.Tensor]:
    """Carve tensors out of one flat buffer.

    On CPU the buffer is an anonymous mapping with MAP_POPULATE: the kernel faults in
    every page in one call instead of one fault per 4 KiB page on first write, which
    is the biggest cost of loading from the page cache after the copy itself.
    """
    sizes = [math.prod(s) * d.itemsize for s, d in zip(shapes, dtypes)]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + -(-n // ALIGN) * ALIGN)
    total = max(offsets[-1], ALIGN)
    if device.type == "cpu":
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        flat = torch.frombuffer(mmap.mmap(-1, total, flags=flags), dtype=torch.uint8)
    else:
        flat = torch.empty(total, dtype=torch.uint8, device=device)
    return [flat[o : o + n].view(d).view(s) for o, n, s, d in zip(offsets, sizes, shapes, dtypes)]


def load_weights(path: str | Path, layout: Layout | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", rank: int | None = None, progress: bool = True) -> Weights:
    """This rank's tensors under ``layout``, from an HF or a sharded checkpoint.

    ``dtype=None`` keeps each tensor in the checkpoint's own dtype, so a reshard is
    bit-exact. Tensors with identical box lists share one allocation and one read.
    """
    layout = layout or Layout()
    rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
    spec = load_spec(path)
    plan = plan_rank(spec, layout, rank)
    with open_source(path) as source:
        source.check(spec)
        source_dtypes = {name: source.source_dtype(name) for name in spec.tensors()}
        unique: dict[tuple, list[str]] = {}
        for name, sharded in plan.tensors.items():
            unique.setdefault((sharded.shape, sharded.boxes), []).append(name)
        dtypes = [dtype or source_dtypes[boxes[0].source] for _, boxes in unique]
        tensors = arena([shape for shape, _ in unique], dtypes, resolve_device(device))
        weights: dict[str, torch.Tensor] = {}
        bar = progress_bar(zip(unique.items(), tensors), progress and rank == 0, total=len(unique),
                           desc=f"rank {rank} loading", unit="tensor")
        for ((_, boxes), names), tensor in bar:
            for box in boxes:
                source.read(box, tensor)
            weights |= dict.fromkeys(names, tensor)
    return Weights(plan, weights, source_dtypes, Path(path))


def load_model(checkpoint_dir: str | Path, layout: Layout | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, progress: bool = True) -> Model:
    """Load this rank's part of a checkpoint (HF or sharded) under ``layout``; collective over the layout's world.

    The model holds process groups and shared memory: ``close()`` it, or use it as a
    context manager, when loading more than one per process.
    """
    layout = layout or Layout()
    device = resolve_device(device)
    comm = make_comm(layout, device)
    try:
        weights = load_weights(checkpoint_dir, layout, dtype, device, comm.rank, progress)
        model = Model(weights, comm)
    except BaseException:
        comm.close(sync=False)  # the peers may have failed too, or be stuck waiting: no barrier
        raise
    log.info("rank %d loaded %d tensors, %.1f MB", comm.rank, len(weights.tensors),
             weights.plan.nbytes(dtype) / 1e6)
    return model
