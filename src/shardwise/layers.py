"""Tensor-parallel layers over already-sharded local weights.

Weights arrive finished from the loader (the plan decided which rows or columns a
rank holds), so these layers never slice anything; each one only knows which
collective completes its output. That keeps parallelism out of the model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import Comm


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """Output features split across TP ranks; each rank's output is its own slice, no communication."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = _param(weight), _param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split across TP ranks; partial sums are all-reduced, then the (replicated) bias added once."""

    def __init__(self, comm: Comm, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.comm = comm
        self.weight, self.bias = _param(weight), _param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.tp_all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a vocab range; ids outside it contribute zeros, and an all-reduce assembles rows."""

    def __init__(self, comm: Comm, weight: torch.Tensor, vocab: tuple[int, int]):
        super().__init__()
        self.comm, self.lo, self.hi = comm, *vocab
        self.weight = _param(weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.layout.tp == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.lo) & (ids < self.hi)
        out = F.embedding((ids - self.lo) * mine, self.weight) * mine.unsqueeze(-1)
        return self.comm.tp_all_reduce(out)


class ParallelLMHead(nn.Module):
    """Each rank scores its vocab range; an (uneven) all-gather yields full-vocabulary logits everywhere."""

    def __init__(self, comm: Comm, weight: torch.Tensor, vocab_sizes: list[int]):
        super().__init__()
        self.comm, self.sizes = comm, vocab_sizes
        self.weight = _param(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.tp_all_gather(F.linear(x, self.weight), self.sizes)
