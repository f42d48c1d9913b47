"""Rank-side checks for tests/test_collectives.py: each primitive's forward and gradient against one process's math.

Every rank builds the same seeded float64 tensors, so each can compute the single-rank
reference itself; a rank returns the largest difference it saw per check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardwise.dist import shm
from shardwise.dist.collectives import copy_to, gather_from, linear_gathered, reduce_from, reduce_scatter_to, shared_sum
from shardwise.dist.group import Group
from shardwise.train.loss import IGNORE_INDEX, vocab_parallel_cross_entropy

ROWS = 5


def seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def piece(x: torch.Tensor, sizes: tuple[int, ...], rank: int, dim: int = -1) -> torch.Tensor:
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank])


_GROUPS: dict[str, Group] = {}  # this rank's groups, attached once per launch


def group_of(transport: str) -> Group:
    """The world as a ``Group``: through gloo, or through shared memory whose slots hold 64 bytes, so that every
    tensor of these tests goes in several rounds (None on a machine without it)."""
    if transport not in _GROUPS:
        shm_now = None
        if transport == "shared memory":
            capacity, shm.CAPACITY = shm.CAPACITY, 64
            try:
                shm_now = shm.attach(dist.group.WORLD, list(range(dist.get_world_size())), 60)
            finally:
                shm.CAPACITY = capacity
        _GROUPS[transport] = Group(dist.group.WORLD, shm_now)
    return _GROUPS[transport]


def primitives(sizes: tuple[int, ...], transport: str, dim: int) -> dict[str, float]:
    """Forward and gradient of each primitive, the group being the world and rank r's slice ``sizes[r]`` wide along
    ``dim`` of a 2-d tensor (dim 0: every slice contiguous; dim -1: none is).

    Each rank r applies its own seeded weights ``w_r`` to its output, so the total loss is
    the sum over ranks; the reference is the gradient of that sum taken in one process.
    """
    rank, world, group = dist.get_rank(), dist.get_world_size(), group_of(transport)
    width = sum(sizes)

    def shape(n: int) -> tuple[int, int]:
        return (ROWS, n) if dim == -1 else (n, ROWS)

    out: dict[str, float] = {"shared memory": float(group.shm is not None)}

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max()) if a.shape == b.shape else float("inf")

    # copy: every rank uses the same input; its gradient is the sum of every rank's.
    x = seeded(1, *shape(width)).requires_grad_()
    w = [seeded(10 + r, *shape(width)) for r in range(world)]
    y = copy_to(x, group)
    (y * w[rank]).sum().backward()
    out["copy forward"] = err(y.detach(), x.detach())
    out["copy grad"] = err(x.grad, sum(w))

    # reduce: rank r holds a partial x_r; the sum is used once (the same loss on every rank).
    parts = [seeded(20 + r, *shape(width)) for r in range(world)]
    x = parts[rank].clone().requires_grad_()
    v = seeded(30, *shape(width))
    y = reduce_from(x, group)
    (y * v).sum().backward()
    out["reduce forward"] = err(y.detach(), sum(parts))
    out["reduce grad"] = err(x.grad, v)

    # reduce-scatter: rank r holds a partial x_r and keeps its slice of the sum, applying w_r to it.
    parts = [seeded(80 + r, *shape(width)) for r in range(world)]
    x = parts[rank].clone().requires_grad_()
    w = [seeded(40 + r, *shape(sizes[r])) for r in range(world)]
    y = reduce_scatter_to(x, sizes, group, dim)
    (y * w[rank]).sum().backward()
    out["reduce-scatter forward"] = err(y.detach(), piece(sum(parts), sizes, rank, dim))
    out["reduce-scatter grad"] = err(x.grad, torch.cat(w, dim=dim))

    # gather: rank r holds slice r; the full result is used once.
    full = seeded(3, *shape(width))
    x = piece(full, sizes, rank, dim).clone().requires_grad_()
    v = seeded(50, *shape(width))
    y = gather_from(x, sizes, group, dim)
    (y * v).sum().backward()
    out["gather forward"] = err(y.detach(), full)
    out["gather grad"] = err(x.grad, piece(v, sizes, rank, dim))

    # shared sum: rank r holds a partial x_r and applies its own w_r to the sum (a norm's statistic over heads split
    # across ranks), so the loss is the sum over ranks and each x_r's gradient the sum of every w_r.
    parts = [seeded(60 + r, *shape(width)) for r in range(world)]
    x = parts[rank].clone().requires_grad_()
    w = [seeded(70 + r, *shape(width)) for r in range(world)]
    y = shared_sum(x, group)
    (y * w[rank]).sum().backward()
    out["shared sum forward"] = err(y.detach(), sum(parts))
    out["shared sum grad"] = err(x.grad, sum(w))

    # the projection of gathered tokens (sequence parallelism): rank r holds tokens r, of which every rank projects
    # all with its own weight w_r, its output used once (as by a column-parallel layer).
    tokens = seeded(5, 2, width, 3)
    x = piece(tokens, sizes, rank, 1).clone().requires_grad_()
    w = [seeded(90 + r, 4, 3).requires_grad_() for r in range(world)]
    v = [seeded(100 + r, 2, width, 4) for r in range(world)]
    y = linear_gathered(x, w[rank], None, sizes, group)
    (y * v[rank]).sum().backward()
    reference = tokens.clone().requires_grad_()
    sum((F.linear(reference, w_r.detach()) * v_r).sum() for w_r, v_r in zip(w, v)).backward()
    out["gathered linear forward"] = err(y.detach(), F.linear(tokens, w[rank].detach()))
    out["gathered linear grad"] = err(x.grad, piece(reference.grad, sizes, rank, 1))
    out["gathered linear weight grad"] = err(w[rank].grad, torch.einsum("bto,bti->oi", v[rank], tokens))
    return out


def cross_entropy(sizes: tuple[int, ...], dtype: str) -> dict[str, float]:
    """The vocab-parallel loss and its logits' gradient against ``F.cross_entropy`` on the full logits.

    Targets fall in every rank's slice, and some are ``IGNORE_INDEX``.
    """
    rank, group = dist.get_rank(), dist.group.WORLD
    vocab = sum(sizes)
    full = (seeded(4, 3, 7, vocab) * 4).to(getattr(torch, dtype))
    targets = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(5))
    targets[0, :2] = IGNORE_INDEX
    out: dict[str, float] = {}
    for reduction in ("mean", "sum", "none"):
        reference = full.detach().clone().requires_grad_()
        expected = F.cross_entropy(reference.double().flatten(0, 1), targets.flatten(), reduction=reduction,
                                   ignore_index=IGNORE_INDEX)
        g = seeded(6, *expected.shape)
        (expected * g).sum().backward()
        local = piece(full, sizes, rank).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, targets, sum(sizes[:rank]), group, reduction=reduction)
        (loss.double().flatten() * g.flatten()).sum().backward()
        out[f"{reduction} loss"] = float((loss.double().flatten() - expected.flatten()).abs().max())
        out[f"{reduction} grad"] = float((local.grad.double() - piece(reference.grad, sizes, rank)).abs().max())
    return out


_SHM: list = []  # this rank's shared-memory all-to-all, attached once per launch


def all_to_all(counts: tuple[tuple[int, ...], ...], row: tuple[int, ...], dtype: str) -> dict[str, object]:
    """The shared-memory all-to-all against gloo's: rank r sends ``counts[r][d]`` seeded rows of shape ``row`` to
    rank d. Returns whether the rows matched gloo's exactly and whether shared memory carried them (it declines,
    on every rank alike, when any rank's rows do not fit its slot); and the same of ``exchange_runs`` (the rows to
    each rank in two runs, their counts carried along), through the group's transport and through gloo alone."""
    from shardwise.dist.collectives import all_to_all_rows, exchange_runs
    from shardwise.dist.shm import attach_all_to_all

    if not _SHM:
        _SHM.append(attach_all_to_all(dist.group.WORLD, list(range(dist.get_world_size())), 60))
    shm, rank = _SHM[0], dist.get_rank()
    send = list(counts[rank])
    receive = [counts[r][rank] for r in range(len(counts))]
    x = seeded(rank, sum(send), *row).to(getattr(torch, dtype))
    expected = x.new_empty((sum(receive), *row))
    dist.all_to_all_single(expected, x, receive, send)
    got = x.new_empty((sum(receive), *row))
    used = shm is not None and shm(got, x, receive, send)
    if not used:
        got = all_to_all_rows(x, send, receive, dist.group.WORLD, shm)
    out = {"equal": bool(torch.equal(got, expected)), "shared memory": bool(used)}
    halves = [[n // 2, n - n // 2] for n in send]
    runs_expected = [[n // 2, n - n // 2] for n in receive]
    for name, transport in (("runs", shm), ("runs over gloo", None)):
        rows, runs, sent = exchange_runs(x, [c for pair in halves for c in pair], [2] * len(send), dist.group.WORLD,
                                         transport)
        out[name] = bool(torch.equal(rows, expected)) and runs == runs_expected and sent == send
    return out


def run(cases: list[tuple[str, tuple]]) -> list[list[dict[str, float]]]:
    """Every case (a function name here and its arguments), each rank's result, on rank 0."""
    results = []
    for name, args in cases:
        mine = globals()[name](*args)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        results.append(everyone)
    return results
