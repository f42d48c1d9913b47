"""``shardwise bench plan``: one rank's planning at a layout's full size, from a config alone.

What a rank works out before it reads a byte: its plan (box lists), the elements it owns
(export, sharded saves and the gradient norm go through them), the sets of ranks its
gradients are summed over, and its bytes by role. Each is timed from an empty plan cache, on
the rank that consults the most others (the last: highest in rank order, on the stage with
the head).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..plan.mesh import Layout
from ..plan.rank import forget_plans, plan_rank
from ..plan.spec import ModelSpec
from ..providers.zero3 import memory_plan
from ..train.grads import partials, reduction_groups, stage_partials
from ..train.weights import training_memory


def bench_plan(spec: ModelSpec, layout: Layout, rank: int, provider: str) -> dict:
    """Seconds of each planning step of ``rank`` under ``provider``, each from an empty plan cache (so each step
    re-plans the rank and the peers it consults; the spec's own small caches are warm after the first), and what
    it found."""
    row: dict = {"provider": provider, "world": layout.world_size, "rank": rank}

    def timed(key: str, fn: Callable[[], object]) -> object:
        forget_plans()
        t0 = time.perf_counter()
        out = fn()
        row[f"{key}_s"] = time.perf_counter() - t0
        return out

    plan = timed("plan", lambda: plan_rank(spec, layout, rank, provider))
    owned = timed("owned", lambda: plan_rank(spec, layout, rank, provider).owned())
    groups = timed("groups", lambda: [reduction_groups(plan_rank(spec, layout, rank, provider), find)
                                      for find in (partials, stage_partials)])
    memory = timed("memory", lambda: (training_memory(plan_rank(spec, layout, rank, provider)),
                                      memory_plan(plan_rank(spec, layout, rank, provider), torch.float32,
                                                  torch.bfloat16, 1, False) if provider == "zero3" else {}))
    row["total_s"] = sum(row[f"{k}_s"] for k in ("plan", "owned", "groups", "memory"))
    row |= {"held_elements": sum(b.numel for b in plan.buffers), "owned_boxes": len(owned),
            "reduction_groups": sum(len(g) for g in groups), "training_bytes": sum(memory[0].values())}
    return row
