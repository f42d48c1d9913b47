"""Tokens/s of a prefill and of decode steps, timed alike for shardwise's model and HF's.

Decode is timed as the difference between generating N+1 tokens and 1 (the prefill and the
first token), so it counts decode steps alone; each figure is the best of ``REPEATS`` runs,
every rank starting from a barrier.
"""

from __future__ import annotations

import time

import torch

from ..plan.spec import load_spec
from .measure import barrier

REPEATS = 3  # each rate is the best of these


def prompts(directory: str, batch: int, length: int) -> torch.Tensor:
    """The same random prompts everywhere (seeded), from the model's vocabulary."""
    return torch.randint(0, load_spec(directory).vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def rates(forward, generate, ids: torch.Tensor, new_tokens: int, clock: list[float] | None = None) -> dict:
    """Prefill and decode tokens/s of ``forward(ids)`` and ``generate(ids, n)``, each the best of ``REPEATS``; with
    a ``clock`` (seconds some part of the model has spent, kept by the caller) also that part's seconds per
    decode step in the same best runs (``part_s``)."""
    generate(ids[:, :8], 2)  # warm-up: first-call allocations and thread pools
    timings: dict[str, list[tuple[float, float]]] = {"prefill": [], "first": [], "all": []}
    kept = clock or [0.0]
    for _ in range(REPEATS):
        for key, run in (("prefill", lambda: forward(ids)), ("first", lambda: generate(ids, 1)),
                         ("all", lambda: generate(ids, new_tokens + 1))):
            barrier()
            t0, part = time.perf_counter(), kept[0]
            with torch.no_grad():
                run()
            timings[key].append((time.perf_counter() - t0, kept[0] - part))
    best = {key: min(runs) for key, runs in timings.items()}
    b, t = ids.shape
    decode = best["all"][0] - best["first"][0]  # None below: too few new tokens to rise above the noise
    out = {"prefill_tok_s": b * t / best["prefill"][0],
           "decode_tok_s": b * new_tokens / decode if decode > 0 else None}
    if clock is not None:
        out["part_s"] = max(0.0, best["all"][1] - best["first"][1]) / new_tokens
    return out


def hf_generate(model):
    """HF's greedy ``generate`` as ``rates`` calls it: ``(ids, n)``, exactly n new tokens."""
    def generate(x: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return generate
