"""Weight initialisation that is the same model on every layout.

A model trained from scratch under TP/PP must start from the same weights whatever the
grid, or a tp=1 run cannot check a tp=4 one and a run cannot be resumed on another
grid. So each element's value is a function of (seed, HF tensor name, global index)
only, never of the rank: every row of a matrix is drawn from its own generator, seeded
by a stable hash of (seed, name, row), and a rank draws just the rows its boxes cover.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from ..plan.boxes import Box
from ..plan.mesh import Layout
from ..plan.rank import plan_rank
from ..plan.spec import ModelSpec
from ..progress import progress_bar
from ..providers.weights import Weights, allocate, resolve_device

INIT_STD = 0.02
"""Std of every weight matrix and of the embedding: HF's ``initializer_range`` and Megatron's default."""

NORM_VALUE = 1.0
"""RMSNorm gains start at 1 so each norm starts as a pure normalisation."""

BIAS_VALUE = 0.0
"""Biases start at 0 so they add nothing until training moves them."""


def init_values(spec: ModelSpec, box: Box, seed: int, zero_residual: bool = False) -> torch.Tensor:
    """float32 tensor of shape ``box.shape``: initial values of HF tensor ``box.source`` over ``box.start:box.stop``.

    ``zero_residual`` starts the residual projections at exactly zero, so every layer starts as
    the identity on the residual stream.
    """
    shape = _checked_shape(spec, box)
    rule = spec.source_kinds[box.source].init
    if rule == "zeros":
        return torch.full(box.shape, BIAS_VALUE)
    if rule == "ones":
        return torch.full(box.shape, NORM_VALUE)
    if len(shape) != 2:
        raise ValueError(f"no initialisation rule {rule!r} for {box.source!r} of shape {shape}")
    std = _std(spec, rule, zero_residual)
    if std == 0.0:
        return torch.zeros(box.shape)
    return _normal_rows(box, shape[1], std, seed)


def init_weights(spec: ModelSpec, layout: Layout, seed: int, *, provider: str = "resident",
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", rank: int | None = None,
                 zero_residual: bool = False, source_dir: str | Path | None = None, progress: bool = True) -> Weights:
    """This rank's freshly initialised tensors under ``layout`` and ``provider``: one model for every grid.

    No rank ever builds the whole model: each draws exactly the boxes it holds (its
    masters under ZeRO-3), so ``export`` or ``save_sharded`` of the result is the seed
    checkpoint, whatever (tp, pp, dp) made it. ``source_dir`` is where a tokenizer to
    carry along lives (the config's directory).
    """
    rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
    plan = plan_rank(spec, layout, rank, provider)
    buffers, tensors = allocate(plan, [dtype] * len(plan.buffers), resolve_device(device))
    origin = None if source_dir is None else Path(source_dir)
    weights = Weights(plan, tensors, dict.fromkeys(spec.tensors(), dtype), origin, buffers)
    unique = weights.unique()
    for name, tensor in progress_bar(unique.items(), progress and rank == 0, total=len(unique),
                                     desc=f"rank {rank} initialising", unit="tensor"):
        fill_boxes(tensor, plan.tensors[name].boxes, spec, seed, zero_residual)
    return weights


def fill_boxes(
    dst: torch.Tensor, boxes: Iterable[Box], spec: ModelSpec, seed: int, zero_residual: bool = False
) -> None:
    """Write the initial values of each box at its local offset in ``dst``, cast to ``dst.dtype``."""
    for box in boxes:
        dst[box.local_index()].copy_(init_values(spec, box, seed, zero_residual))


def _checked_shape(spec: ModelSpec, box: Box) -> tuple[int, ...]:
    """The global shape of the box's tensor; a box outside it would silently draw rows that do not exist."""
    info = spec.tensors().get(box.source)
    if info is None:
        raise ValueError(f"{box.source!r} is not a tensor of this {spec.arch} model")
    inside = len(box.start) == len(box.stop) == len(info.shape) and all(
        0 <= a <= b <= n for a, b, n in zip(box.start, box.stop, info.shape)
    )
    if not inside:
        raise ValueError(f"box {box.start}:{box.stop} lies outside {box.source!r} of shape {info.shape}")
    return info.shape


def _std(spec: ModelSpec, rule: str, zero_residual: bool) -> float:
    """``normal`` draws at INIT_STD. ``residual`` projections (o_proj, down_proj) add into the residual stream,
    two per layer: at a fixed std its variance would grow with depth, so GPT-2 and Megatron scale their std by
    1/sqrt(2 * layers) to keep it flat."""
    if rule != "residual":
        return INIT_STD
    return 0.0 if zero_residual else INIT_STD / math.sqrt(2 * spec.layers)


def _row_seed(seed: int, name: str, row: int) -> int:
    """A 63-bit seed that is the same in every process: Python's ``hash`` of a str is salted per process."""
    digest = hashlib.blake2b(f"{seed}/{name}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _normal_rows(box: Box, row_length: int, std: float, seed: int) -> torch.Tensor:
    """Rows ``box.start[0]:box.stop[0]``, each drawn whole from its own generator, then cut to the box's columns.

    Drawing the whole row, at the same length and std every time, makes a column slice equal the
    full tensor's bit for bit (randn's output depends on the length drawn). A generator per row
    costs ~10 us, a 32000x1024 embedding ~0.4 s on one core, so no coarser chunking is needed.
    """
    (r0, c0), (r1, c1) = box.start, box.stop
    out = torch.empty(box.shape)
    row = torch.empty(row_length)
    gen = torch.Generator()
    for i, r in enumerate(range(r0, r1)):
        gen.manual_seed(_row_seed(seed, box.source, r))
        row.normal_(0.0, std, generator=gen)
        out[i] = row[c0:c1]
    return out
