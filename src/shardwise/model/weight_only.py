"""int8 weight-only linear layers: int8 weights with one scale per output row, computed without dequantizing them.

Decoding one token at a time streams every weight once per step, so its speed is set by
the bytes a step reads: int8 weights read half of bf16's. Each rank quantizes its own
tensors at load (symmetric, ``scale = amax / 127`` per output row, as FasterTransformer's
weight-only layers and torchao's ``Int8WeightOnlyConfig`` do), and keeps the int8 weights
and the scales only.

A scale per output row makes TP free of error of its own: a colwise split gives each rank
whole rows, and a rowwise split (``o``, ``down``) gives each rank part of every row, whose
amax the TP ranks agree on (an all-reduce of the maximum) before quantizing, so every TP
degree holds the same int8 values and computes the same sums.

Which tensors are quantized is decided here once (``quantized``): the attention and MLP
projections, and the LM head only when asked. Embedding and norms stay in the compute
dtype; the head does too by default, because the logits are where quantization error
shows most (the argmax of a flat distribution), and a tied head would need an int8 copy
beside the embedding it shares storage with, adding bytes rather than saving them.
MoE routers and experts stay in the compute dtype as well (no grouped int8 kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..plan.boxes import ShardedTensor
from ..plan.rank import RankPlan

PROJECTIONS = ("qkv", "o", "gate_up", "down")  # the decoder layers' linear kinds
BLOCK_ROWS = 1024  # rows quantized, or dequantized where torch has no int8 kernel, at once: bounds the temporaries


@dataclass(frozen=True)
class Int8Weight:
    """A linear weight as int8 values ``q`` (out x in) and one scale per output row (``scale``, the compute dtype):
    the weight is ``q * scale[:, None]``."""

    q: torch.Tensor
    scale: torch.Tensor
    requires_grad = False  # weight-only layers are for inference: nothing here trains

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype, index: tuple[slice, slice] = (slice(None), slice(None))) -> torch.Tensor:
        """The weight (or its ``index`` box) in ``dtype``: each int8 value times its row's scale, exact in fp32, then
        rounded once."""
        return (self.q[index].float() * self.scale[index[0]].float()[:, None]).to(dtype)

    def __getitem__(self, index: tuple[slice, slice]) -> torch.Tensor:
        """A (rows, columns) box of the weight in the scales' dtype, and only that box (what export writes, box by
        box)."""
        return self.dequantize(self.scale.dtype, index)


def quantize(w: torch.Tensor, group: dist.ProcessGroup | None = None) -> Int8Weight:
    """``w`` (out x in) as int8 with per-row scales ``amax / 127`` (rounded to ``w``'s dtype, then used as rounded);
    ``group``: the ranks holding the other columns of the same rows, whose amax is agreed on first. Worked through
    ``BLOCK_ROWS`` rows at a time, so the fp32 temporaries stay small next to the weights being loaded."""
    w = w.detach()
    amax = torch.cat([w[i: i + BLOCK_ROWS].abs().amax(dim=1).float() for i in range(0, w.shape[0], BLOCK_ROWS)])
    if group is not None:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    scale = (amax / 127).to(w.dtype)
    step = scale.float().masked_fill(scale == 0, 1.0)  # an all-zero row: q = 0 whatever the step
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for i in range(0, w.shape[0], BLOCK_ROWS):
        rows = slice(i, i + BLOCK_ROWS)
        q[rows] = torch.round(w[rows].float() / step[rows, None]).clamp_(-127, 127)
    return Int8Weight(q, scale)


def int8_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (q * scale).T + bias``: torch's int8 weight-only kernel where it runs (``_kernel_runs``), else the matmul
    over ``BLOCK_ROWS`` output rows at a time, each block dequantized, so no full-precision copy of the whole weight
    is ever made."""
    if _kernel_runs(x, w):
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w.q, w.scale).view(*x.shape[:-1], -1)
    else:  # each block dequantized before the sum: int8 values summed unscaled would overflow fp16
        y = torch.cat([F.linear(x, w.q[i: i + BLOCK_ROWS].to(x.dtype) * w.scale[i: i + BLOCK_ROWS, None].to(x.dtype))
                       for i in range(0, w.q.shape[0], BLOCK_ROWS)], dim=-1)
    return y if bias is None else y + bias


def _kernel_runs(x: torch.Tensor, w: Int8Weight) -> bool:
    """Whether torch's int8 weight-only kernel takes these operands: CPU or MPS, 16-bit activations with scales of
    their dtype, and an input width that is a multiple of 8 (on CPU it crashes the process otherwise, which an
    uneven TP split of the columns gives)."""
    return (x.device.type in ("cpu", "mps") and x.dtype in (torch.bfloat16, torch.float16)
            and w.scale.dtype == x.dtype and x.shape[-1] % 8 == 0 and w.q.is_contiguous())


def quantized(plan: RankPlan, head: bool) -> list[str]:
    """The rank's tensors that int8 weight-only quantizes: its layers' projections, and its LM head if ``head``."""
    kinds = set(PROJECTIONS) | ({"lm_head"} if head else set())
    return [name for name in plan.work if name.kind in kinds]


def nbytes(plan: RankPlan, dtype: torch.dtype, head: bool) -> int:
    """Bytes this rank holds with int8 weight-only: int8 values and a ``dtype`` scale per row for the quantized
    tensors, ``dtype`` for the rest (a tensor sharing another's storage counted once)."""
    total = sum(b.numel for b in plan.buffers) * dtype.itemsize  # resident: the buffers hold the work tensors
    return total + sum(stored_bytes(plan.work[name], dtype, name in plan.alias) for name in quantized(plan, head))


def stored_bytes(t: ShardedTensor, dtype: torch.dtype, shared: bool) -> int:
    """What quantizing ``t`` changes in a rank's bytes: int8 values and a ``dtype`` scale per row, less its ``dtype``
    bytes unless it ``shared`` them with another tensor (a tied head keeps its embedding and gains an int8 copy)."""
    return t.numel + t.shape[0] * dtype.itemsize - (0 if shared else t.numel * dtype.itemsize)


def quantize_weights(plan: RankPlan, tensors: dict[str, torch.Tensor | Int8Weight], tp_group: dist.ProcessGroup | None,
                     head: bool) -> dict[str, torch.Tensor | Int8Weight]:
    """``tensors`` with the ``quantized`` ones as ``Int8Weight`` (those read as int8 already kept); a rowwise
    tensor's amax agreed over ``tp_group``."""
    def make(name: str, t: torch.Tensor | Int8Weight) -> Int8Weight:
        if isinstance(t, Int8Weight):
            return t
        rowwise = plan.styles[name.kind] == "rowwise" and plan.layout.tp > 1
        return quantize(t, tp_group if rowwise else None)

    return with_int8(tensors, {name: make for name in quantized(plan, head)})


def with_int8(tensors: dict[str, torch.Tensor | Int8Weight], made: dict[str, Callable[[str, torch.Tensor], Int8Weight]]
              ) -> dict[str, torch.Tensor | Int8Weight]:
    """``tensors`` with each name of ``made`` replaced by what its function makes of it (quantized, or read as int8
    from a quantized checkpoint); the others are copied out of the load's arena, so the full-precision weights
    are freed with it."""
    out: dict[str, torch.Tensor | Int8Weight] = {}
    copies: dict[int, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in made:
            out[name] = made[name](name, t)
        else:
            if id(t) not in copies:  # a view of the load's arena is copied out of it; a tensor of its own is kept
                arena = isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > t.nbytes
                copies[id(t)] = t.clone() if arena else t
            out[name] = copies[id(t)]
    return out
