"""``shardwise bench reduce-scatter``: ZeRO-3's gradient reduction of one block over a DP group, both ways.

A ZeRO-3 rank keeps only its chunk of each block's summed gradient: a reduce-scatter. On one
host the DP group's shared-memory segment does it by each rank writing the other ranks' parts
of its block and summing its own part from every rank's (``shm.ShmCollectives``); over gloo,
whose reduce-scatter is slower than its all-reduce, the block is all-reduced and cut. Both run
here on the same block, in turns, through the ``Group`` the reducer uses, against a memcpy of
the block (the floor a rank's own write cannot beat).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..dist.group import Group
from ..dist.shm import attach, timeout_seconds
from .measure import all_ranks, barrier


def bench_reduce_scatter_rank(megabytes: float, repeats: int) -> dict:
    """Median seconds of one block's reduce-scatter through shared memory and through gloo (all-reduce and cut),
    the slower rank's, and the bytes each moves per rank: a reduce-scatter's, or an all-reduce's (twice as many)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    numel = max(int(megabytes * 2**20) // 4 // world, 1) * world
    block = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    sizes = [numel // world] * world
    shm = attach(dist.group.WORLD, list(range(world)), timeout_seconds())
    if shm is None:
        raise RuntimeError(f"rank {rank}: the ranks map no shared-memory segment together (SHARDWISE_SHM=0, or not "
                           "one host): there is no shared-memory path to compare")
    groups = {"shared_memory": Group(dist.group.WORLD, shm), "gloo": Group(dist.group.WORLD, None)}
    results = {name: group.reduce_scatter(block, sizes, 0) for name, group in groups.items()}
    times: dict[str, list[float]] = {name: [] for name in groups}
    copy = torch.empty_like(block)
    times["memcpy"] = []
    for _ in range(repeats):
        for name, group in groups.items():
            barrier()
            t0 = time.perf_counter()
            group.reduce_scatter(block, sizes, 0)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        copy.copy_(block)
        times["memcpy"].append(time.perf_counter() - t0)
    shm.close()
    share = (world - 1) / world * block.nbytes
    out = {"world": world, "block_bytes": block.nbytes, "repeats": repeats,
           "same_sums": all(all_ranks(torch.allclose(results["shared_memory"],
                                                                                    results["gloo"]))),
           "reduce_scatter_bytes": share, "shared_memory_bytes": share, "gloo_bytes": 2 * share}
    for name, seconds in times.items():
        out[f"{name}_s"] = max(all_ranks(statistics.median(seconds)))
    out["gloo_over_shared_memory"] = out["gloo_s"] / out["shared_memory_s"]
    return out
