"""From checkpoint bytes to a rank's model: spec -> plan -> boxes read into local tensors."""

from __future__ import annotations

import logging
import math
import mmap
import os
from pathlib import Path

import torch
from tqdm import tqdm

from .comm import make_comm
from .layout import Layout, RankPlan, plan_rank
from .model import Model
from .reader import Checkpoint
from .spec import load_spec

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cuda"`` means this rank's own GPU (LOCAL_RANK), so one call works on every rank."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


ALIGN = 64


def arena(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Carve tensors of ``shapes`` out of one flat buffer.

    On CPU the buffer is an anonymous mapping with MAP_POPULATE: the kernel faults in
    every page in one call instead of one fault per 4 KiB page on first write, which
    is the biggest cost of loading from the page cache after the copy itself.
    """
    sizes = [math.prod(s) * dtype.itemsize for s in shapes]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + -(-n // ALIGN) * ALIGN)
    total = max(offsets[-1], ALIGN)
    if device.type == "cpu":
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        flat = torch.frombuffer(mmap.mmap(-1, total, flags=flags), dtype=torch.uint8)
    else:
        flat = torch.empty(total, dtype=torch.uint8, device=device)
    return [flat[o : o + n].view(dtype).view(s) for o, n, s in zip(offsets, sizes, shapes)]


def load_weights(ckpt: Checkpoint, plan: RankPlan, dtype: torch.dtype, device: torch.device,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Allocate every local tensor in one arena and fill each from its boxes.

    Tensors with identical box lists (the embedding and LM head of a tied model on one
    stage) share one allocation, so nothing is read or stored twice.
    """
    unique: dict[tuple, list[str]] = {}
    for name, sharded in plan.tensors.items():
        unique.setdefault((sharded.shape, sharded.boxes), []).append(name)
    tensors = arena([shape for shape, _ in unique], dtype, device)
    weights: dict[str, torch.Tensor] = {}
    bar = tqdm(zip(unique.items(), tensors), total=len(unique), desc=f"rank {plan.rank} loading", unit="tensor",
               disable=not progress or plan.rank != 0, leave=False)
    for ((_, boxes), names), tensor in bar:
        for box in boxes:
            ckpt.read(box, tensor)
        weights |= dict.fromkeys(names, tensor)
    return weights


def load_model(checkpoint_dir: str | Path, layout: Layout | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, progress: bool = True) -> Model:
    """Load this rank's part of an HF checkpoint under ``layout``; collective over the layout's world."""
    spec = load_spec(checkpoint_dir)
    layout = layout or Layout()
    comm = make_comm(layout)
    plan = plan_rank(spec, layout, comm.rank)
    with Checkpoint(checkpoint_dir) as ckpt:
        ckpt.check(spec)
        weights = load_weights(ckpt, plan, dtype, resolve_device(device), progress)
    log.info("rank %d loaded %d tensors, %.1f MB", comm.rank, len(weights), plan.nbytes(dtype) / 1e6)
    return Model(plan, comm, weights)
