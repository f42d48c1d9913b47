"""Tensor-parallel layers over already-sharded local weights, which a provider hands in at each call.

The plan decided which rows or columns a rank holds, so these functions never slice
anything; each one only knows which collective completes its output. They hold no
weights either: the provider gives a block's tensors just before use, which is what
lets resident, ZeRO-3 and layer-sharded weights run the same model code.

When a gradient is wanted (grad mode on and an input or weight requires one), each
collective is the autograd-aware primitive from ``collectives``, so the backward pass
runs the dual collective: the input of a column-parallel layer is ``copy_to`` (its
gradient is summed over the TP group), a row-parallel output ``reduce_from``, the
logits ``gather_from``. Otherwise the in-place fast path (the shared-memory all-reduce)
serves, as inference needs no graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dist.collectives import copy_to, gather_from, linear_gathered, reduce_from, reduce_scatter_to
from ..dist.comm import Comm
from .weight_only import Int8Weight, int8_linear


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _reduce(comm: Comm, y: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """All-reduce partial sums over the TP group, through autograd when ``inputs`` need a gradient."""
    if comm.layout.tp == 1:
        return y
    return reduce_from(y, comm.tp) if needs_grad(*inputs) else comm.tp_all_reduce(y)


def _enter(comm: Comm, x: torch.Tensor, *weights: torch.Tensor | None) -> torch.Tensor:
    """A replicated activation entering a TP-split op: in the backward, every rank's part of its gradient adds up."""
    return copy_to(x, comm.tp) if comm.layout.tp > 1 and needs_grad(x, *weights) else x


def own_tokens(comm: Comm, x: torch.Tensor, seq: list[int]) -> torch.Tensor:
    """This TP rank's tokens (dim 1) of a whole sequence, ``seq`` giving every rank's count (sequence parallelism)."""
    rank = comm.tp_rank
    return x.narrow(1, sum(seq[:rank]), seq[rank])


def gather_tokens(comm: Comm, x: torch.Tensor, seq: list[int]) -> torch.Tensor:
    """Every TP rank's tokens of a sequence-parallel activation, concatenated along the sequence (dim 1); the
    backward keeps this rank's tokens' gradient (a ``copy_to`` after it sums the gradient first, where needed)."""
    if needs_grad(x):
        return gather_from(x, seq, comm.tp, 1)
    return comm.tp_all_gather(x, seq, 1)


def _reduce_tokens(comm: Comm, y: torch.Tensor, seq: list[int], *inputs: torch.Tensor | None) -> torch.Tensor:
    """Partial sums over the TP group summed, each rank keeping its tokens (a reduce-scatter along the sequence);
    the backward all-gathers the gradient."""
    if comm.layout.tp == 1:
        return y
    if needs_grad(*inputs):
        return reduce_scatter_to(y, seq, comm.tp, 1)
    return comm.tp_reduce_scatter(y, seq, 1)


def linear(comm: Comm, x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None, style: str,
           seq: list[int] | None = None) -> torch.Tensor:
    """A projection run as its TP style says (``plan.tp``): split by output features (colwise, with or without a
    later gather: the gather waits until after the per-head or per-element op that follows), by input features
    (rowwise: partial sums all-reduced, then the replicated bias added once), or whole on every rank. The weight
    may be int8 weight-only (``weight_only``).

    With ``seq`` (sequence parallelism: every TP rank's token count) the activations outside hold this rank's
    tokens only: a colwise projection all-gathers its input along the sequence first, a rowwise one reduce-scatters
    its partial sums along it instead of all-reducing them."""
    if style == "replicated" or comm.layout.tp == 1:
        return matmul(x, weight, bias)
    if style == "rowwise":
        y = matmul(x, weight, None)
        y = _reduce(comm, y, x, weight) if seq is None else _reduce_tokens(comm, y, seq, x, weight)
        return y if bias is None else y + bias
    if seq is not None:
        if needs_grad(x, weight, bias):
            return linear_gathered(x, weight, bias, seq, comm.tp)
        x = gather_tokens(comm, x, seq)
    return matmul(_enter(comm, x, weight, bias), weight, bias)


def matmul(x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias``, whether the weight is a tensor or int8 weight-only."""
    return int8_linear(x, weight, bias) if isinstance(weight, Int8Weight) else F.linear(x, weight, bias)


def gather_output(comm: Comm, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """A colwise output's slices (``sizes`` per TP rank, uneven allowed) gathered along the last dim on every rank."""
    if comm.layout.tp == 1:
        return local
    if needs_grad(local):
        return gather_from(local, sizes, comm.tp)
    return comm.tp_all_gather(local, sizes)


def embedding(comm: Comm, ids: torch.Tensor, weight: torch.Tensor, vocab: tuple[int, int] | None,
              seq: list[int] | None = None) -> torch.Tensor:
    """A lookup in this rank's ``vocab`` rows (None: the whole table): ids outside them contribute zeros, and an
    all-reduce assembles the rows (with ``seq``, a reduce-scatter: each rank keeps its tokens' rows)."""
    if vocab is None or comm.layout.tp == 1:
        out = F.embedding(ids, weight)
        return out if seq is None else own_tokens(comm, out, seq)
    lo, hi = vocab
    mine = (ids >= lo) & (ids < hi)
    out = F.embedding((ids - lo) * mine, weight) * mine.unsqueeze(-1)
    return _reduce(comm, out, weight) if seq is None else _reduce_tokens(comm, out, seq, weight)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up projection's output (gate first). Under autograd it keeps that output
    alone for the backward and computes the silu again there: autograd's own graph would also keep the silu's
    output, an extra ffn/tp values per token and layer, a tenth of what a Llama layer keeps. The backward runs
    autograd's own ops, so gradients are the same bits."""
    if needs_grad(gate_up):
        return _SwiGLU.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate, up = ctx.saved_tensors[0].chunk(2, dim=-1)
        return torch.cat([torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp32_scale: bool = False) -> torch.Tensor:
    """HF's RMSNorm: normalized in fp32, then scaled (``scale_norm``) in the input's dtype, or in fp32."""
    h = x.float()
    return scale_norm(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps), weight, x.dtype, fp32_scale)


def scale_norm(h: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, fp32_scale: bool) -> torch.Tensor:
    """Apply a norm's gain to fp32 normalized ``h``: Llama casts to ``dtype`` first, OLMo-2 (``fp32_scale``)
    multiplies in fp32 and casts the product; in bf16 the two round differently."""
    return (weight * h).to(dtype) if fp32_scale else weight * h.to(dtype)
