"""Collectives that know their backward: the four Megatron primitives, a shared sum and an exchange, as autograd
functions.

Tensor parallelism splits a layer's math over ranks, and each split point has a dual
in the backward pass. Written as in-place ``dist`` calls (what inference uses), autograd
cannot see them and the gradients come out silently wrong. Each primitive here is a
``torch.autograd.Function`` whose backward is the dual collective:

==============  ===================  ====================
primitive       forward              backward
==============  ===================  ====================
copy            identity             all-reduce (sum)
reduce          all-reduce (sum)     identity
reduce-scatter  all-reduce, keep     all-gather
                this rank's slice
gather          all-gather           keep this rank's
                                     slice
sum             all-reduce (sum)     all-reduce (sum)
exchange        all-to-all: rows     the reverse
                to their ranks       all-to-all
==============  ===================  ====================

``reduce`` serves a sum every rank then uses alike (a row-parallel output: each rank's
gradient of it is already the whole one); ``sum`` one each rank applies to its own
slice (a norm's statistic over heads split across ranks), whose gradient is the sum of
every rank's.

Slices are given by ``sizes`` (one per rank of the group, any sizes) along ``dim``, so
uneven heads, vocabularies or sequences need no padding by the caller. The group is a
``Group``, whose collectives go through shared memory where its ranks have it; with
``group`` None (a one-rank group) every primitive is the identity. The rows' gather and
exchange (the EP group's) take a process group and its shared-memory all-to-all instead.
Outside autograd (no input needs a gradient, or grad mode is off) the caller uses the
``Group``'s in-place collectives directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .group import Group, all_gather_along
from .shm import ShmAllToAll, run_totals


def copy_to(x: torch.Tensor, group: Group | None) -> torch.Tensor:
    """Identity forward; the backward sums the gradient over ``group`` (an input every rank uses)."""
    return x if group is None else _Copy.apply(x, group)


def reduce_from(x: torch.Tensor, group: Group | None) -> torch.Tensor:
    """Sum over ``group`` (partial results, as after a row-split linear); the backward passes the gradient on."""
    return x if group is None else _Reduce.apply(x, group)


def shared_sum(x: torch.Tensor, group: Group | None) -> torch.Tensor:
    """Sum over ``group`` of a statistic each rank applies to its own slice; the backward sums the gradient too."""
    return x if group is None else _SharedSum.apply(x, group)


def reduce_scatter_to(x: torch.Tensor, sizes: Sequence[int], group: Group | None, dim: int = -1) -> torch.Tensor:
    """Sum over ``group`` of partial results, this rank keeping its slice of ``dim`` (``sizes[rank]`` long: a
    row-parallel output under sequence parallelism); the backward all-gathers the gradient."""
    return x if group is None else _ReduceScatter.apply(x, sizes, group, dim)


def gather_from(x: torch.Tensor, sizes: Sequence[int], group: Group | None, dim: int = -1) -> torch.Tensor:
    """Every rank's slice, concatenated along ``dim``; the backward keeps this rank's slice of the gradient."""
    return x if group is None else _Gather.apply(x, sizes, group, dim)


def linear_gathered(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes: Sequence[int],
                    group: Group) -> torch.Tensor:
    """``F.linear`` of every rank's tokens (dim 1, ``sizes[r]`` from rank r) with this rank's weight: the all-gather
    fused with the column-parallel projection after it, so the backward keeps only this rank's tokens and gathers
    them again (Megatron's sequence parallelism), the input's gradient summed over the group and cut to this rank's
    tokens (a reduce-scatter)."""
    return _LinearGathered.apply(x, weight, bias, sizes, group)


def gather_rows(x: torch.Tensor, sizes: Sequence[int], group: dist.ProcessGroup, shm: ShmAllToAll | None = None
                ) -> torch.Tensor:
    """Every rank's rows (``sizes[r]`` from rank r), concatenated in rank order; the backward keeps this rank's
    rows of the gradient. Through shared memory where the group has it (each rank's rows sent to every rank)."""
    return _GatherRows.apply(x, sizes, group, shm)


def exchange(x: torch.Tensor, send: list[int], receive: list[int], group: dist.ProcessGroup,
             shm: ShmAllToAll | None = None) -> torch.Tensor:
    """All-to-all of rows: ``send[r]`` consecutive rows of ``x`` go to rank r, ``receive[r]`` come from it, in rank
    order; the backward sends each row's gradient back where the row came from."""
    return _Exchange.apply(x, send, receive, group, shm)


def exchange_runs(x: torch.Tensor, counts: list[int], widths: list[int], group: dist.ProcessGroup,
                  shm: ShmAllToAll | None = None) -> tuple[torch.Tensor, list[list[int]], list[int]]:
    """``exchange`` of rows in runs (the rows per expert): ``counts`` consecutive runs of ``x``, ``widths[r]`` of
    them for rank r, in rank order. Returns the rows for this rank, each sender's runs for it (``[sender][run]``),
    which order them, and the rows sent to each rank (what comes back when the receivers answer). Through shared
    memory the counts ride in the rows' header (one exchange), else in a small all-to-all first."""
    got = None if shm is None else shm.split(x.detach(), counts, widths)
    if got is None:
        mine = widths[dist.get_rank(group)]
        runs = all_to_all_rows(torch.tensor(counts), widths, [mine] * len(widths), group).view(-1, mine).tolist()
    else:
        runs = got[1]
    send = run_totals(counts, widths)
    rows = _Exchange.apply(x, send, [sum(r) for r in runs], group, shm, None if got is None else got[0])
    return rows, runs, send


def all_to_all_rows(x: torch.Tensor, send: list[int], receive: list[int], group: dist.ProcessGroup,
                    shm: ShmAllToAll | None = None) -> torch.Tensor:
    """``exchange`` without autograd (ids, counts); through shared memory where the group has it and the rows fit."""
    out = x.new_empty((sum(receive), *x.shape[1:]))
    if shm is None or not shm(out, x, receive, send):
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
    return out


def _slice(x: torch.Tensor, sizes: Sequence[int], group: Group, dim: int = -1) -> torch.Tensor:
    """This rank's ``sizes`` slice of ``x`` along ``dim``."""
    rank = group.rank
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()


def _check(x: torch.Tensor, sizes: Sequence[int], group: Group, dim: int, whole: bool) -> None:
    """``sizes`` must give one slice per rank, and ``x`` along ``dim`` be their sum (``whole``) or this rank's."""
    if len(sizes) != group.size:
        raise ValueError(f"rank {dist.get_rank()}: sizes {sizes} give {len(sizes)} slices for a group of {group.size}")
    want = sum(sizes) if whole else sizes[group.rank]
    if x.shape[dim] != want:
        raise ValueError(f"rank {dist.get_rank()}: dim {dim} of a tensor of shape {tuple(x.shape)} is {x.shape[dim]}, "
                         f"expected {want}, {'the sum' if whole else f'slice {group.rank}'} of sizes {list(sizes)}")


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    return group.all_reduce(x.contiguous().clone())


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SharedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: Sequence[int], group: Group, dim: int) -> torch.Tensor:
        _check(x, sizes, group, dim, whole=True)
        ctx.sizes, ctx.group, ctx.dim = sizes, group, dim
        return group.reduce_scatter(x, sizes, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.group.all_gather(grad, ctx.sizes, ctx.dim), None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: Sequence[int], group: Group, dim: int) -> torch.Tensor:
        _check(x, sizes, group, dim, whole=False)
        ctx.sizes, ctx.group, ctx.dim = sizes, group, dim
        return group.all_gather(x, sizes, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _slice(grad, ctx.sizes, ctx.group, ctx.dim), None, None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: Sequence[int], group: dist.ProcessGroup, shm: ShmAllToAll | None
                ) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank(group)
        everyone = len(sizes)
        out = x.new_empty((sum(sizes), *x.shape[1:]))
        if shm is None or not shm(out, x.repeat(everyone, *[1] * (x.dim() - 1)), list(sizes), [len(x)] * everyone):
            out = all_gather_along(x, sizes, group, 0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None, None


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], receive: list[int], group: dist.ProcessGroup,
                shm: ShmAllToAll | None, done: torch.Tensor | None = None) -> torch.Tensor:
        """``done``: the rows already exchanged (``exchange_runs`` through shared memory), for autograd to see."""
        ctx.send, ctx.receive, ctx.group, ctx.shm = send, receive, group, shm
        return all_to_all_rows(x, send, receive, group, shm) if done is None else done

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_to_all_rows(grad, ctx.receive, ctx.send, ctx.group, ctx.shm), None, None, None, None, None


class _LinearGathered(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes: Sequence[int],
                group: Group) -> torch.Tensor:
        ctx.sizes, ctx.group, ctx.bias = sizes, group, bias is not None
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(group.all_gather(x, sizes, 1), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = ctx.group.reduce_scatter(grad @ weight, ctx.sizes, 1)
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            tokens = ctx.group.all_gather(x, ctx.sizes, 1)
            grad_w = grad.flatten(0, -2).t() @ tokens.flatten(0, -2)
        if ctx.bias and ctx.needs_input_grad[2]:
            grad_b = grad.flatten(0, -2).sum(0)
        return grad_x, grad_w, grad_b, None, None
