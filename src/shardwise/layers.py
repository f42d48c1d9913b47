"""Tensor-parallel layers over already-sharded local weights, which a provider hands in at each call.

The plan decided which rows or columns a rank holds, so these functions never slice
anything; each one only knows which collective completes its output. They hold no
weights either: the provider gives a block's tensors just before use, which is what
lets resident, ZeRO-3 and layer-sharded weights run the same model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .comm import Comm


def column_parallel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Output features split across TP ranks: each rank's output is its own slice, no communication."""
    return F.linear(x, weight, bias)


def row_parallel(comm: Comm, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Input features split across TP ranks: partial sums are all-reduced, then the (replicated) bias added once."""
    y = comm.tp_all_reduce(F.linear(x, weight))
    return y if bias is None else y + bias


def vocab_parallel_embedding(comm: Comm, ids: torch.Tensor, weight: torch.Tensor,
                             vocab: tuple[int, int]) -> torch.Tensor:
    """Each rank holds a vocab range; ids outside it contribute zeros, and an all-reduce assembles rows."""
    if comm.layout.tp == 1:
        return F.embedding(ids, weight)
    lo, hi = vocab
    mine = (ids >= lo) & (ids < hi)
    out = F.embedding((ids - lo) * mine, weight) * mine.unsqueeze(-1)
    return comm.tp_all_reduce(out)


def parallel_lm_head(comm: Comm, x: torch.Tensor, weight: torch.Tensor, vocab_sizes: list[int]) -> torch.Tensor:
    """Each rank scores its vocab range; an (uneven) all-gather yields full-vocabulary logits everywhere."""
    return comm.tp_all_gather(F.linear(x, weight), vocab_sizes)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalized in fp32, scaled in the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
