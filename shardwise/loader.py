"""From checkpoint bytes to a rank's model: spec -> plan -> boxes read into local tensors."""

from __future__ import annotations

import logging
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


def load_weights(ckpt: Checkpoint, plan: RankPlan, dtype: torch.dtype, device: torch.device,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Allocate each local tensor once and fill it from its boxes.

    Tensors with identical box lists (the embedding and LM head of a tied model on one
    stage) share one allocation, so nothing is read or stored twice.
    """
    weights: dict[str, torch.Tensor] = {}
    seen: dict[tuple, torch.Tensor] = {}
    bar = tqdm(plan.tensors.items(), desc=f"rank {plan.rank} loading", unit="tensor",
               disable=not progress or plan.rank != 0, leave=False)
    for name, sharded in bar:
        key = (sharded.shape, sharded.boxes)
        if key not in seen:
            seen[key] = sharded.allocate(dtype, device)
            for box in sharded.boxes:
                ckpt.read(box, seen[key])
        weights[name] = seen[key]
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
