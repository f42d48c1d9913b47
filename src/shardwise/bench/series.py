"""``shardwise bench series``: decode time per token with and without layer-sharded series, in one run.

Every setting is loaded side by side on the same DP group and fed the same seeded
prompt: plain replicas, the series as one host shares it (every rank reading the owner's
copy in place), and the series broadcast k=0, 1, 2 layers ahead as ranks on different hosts
would (through gloo, ``SHARDWISE_SHM=0``). The timed generations then take turns (plain,
shared, k=0, k=1, k=2, plain, ...), so a drift in the machine's speed touches every setting
alike. A generation's decode time
is the time from its first new token to its last, per token. A forward over a longer
prompt (prefill) is timed apart: a series pays the same broadcasts per layer for it, but
against far more compute, so the two ends of the trade show in one run.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator

import torch

from ..io.loader import load_model
from ..model.forward import Model
from ..plan.mesh import Layout
from ..plan.series import Series
from ..plan.spec import load_spec
from .measure import all_ranks, barrier

PATTERNS = ("*.o", "*.down")


def bench_series_rank(checkpoint: str, new_tokens: int = 32, prompt_tokens: int = 32, repeats: int = 5,
                      dtype: torch.dtype = torch.bfloat16, patterns: tuple[str, ...] = PATTERNS,
                      ks: tuple[int, ...] = (0, 1, 2), prefill_tokens: int = 128) -> dict:
    """Plain DP replicas against the same replicas with ``patterns`` in series at each prefetch step in ``ks``.

    Returns one dict (the same on every rank): ``plain_s_per_token``, ``shared_s_per_token``
    and ``broadcast_k{K}_s_per_token``, each the largest of the ranks' medians over
    ``repeats`` generations, their ratios to plain, the same for one forward over
    ``prefill_tokens`` tokens (``*_prefill_s``; 0 tokens skips it), the bytes each rank
    holds, whether every setting generated the same tokens, and which provider the shared
    setting got (``SeriesProvider`` where the ranks could not share memory).
    """
    if new_tokens < 2 or prompt_tokens < 1 or repeats < 1 or prefill_tokens < 0:
        raise ValueError("new_tokens must be >= 2 (decode time is measured between tokens), prompt_tokens and "
                         "repeats >= 1, prefill_tokens >= 0")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    layout = Layout(dp=world)
    spec = load_spec(checkpoint)
    seeded = torch.randint(0, spec.vocab, (1, max(prompt_tokens, prefill_tokens)),
                           generator=torch.Generator().manual_seed(0))
    ids, prefill = seeded[:, :prompt_tokens], seeded[:, :prefill_tokens]
    models = {"plain": load_model(checkpoint, layout, dtype=dtype, progress=False),
              "shared": load_model(checkpoint, layout, dtype=dtype, progress=False, provider="series",
                                   series=tuple(Series(p) for p in patterns))}
    with _broadcasting():
        for k in ks:
            models[f"broadcast_k{k}"] = load_model(checkpoint, layout, dtype=dtype, progress=False,
                                                   provider="series", series=tuple(Series(p, prefetch=k)
                                                                                   for p in patterns))
    try:
        tokens = {name: model.generate(ids, 2) for name, model in models.items()}  # warm-up
        times: dict[str, list[float]] = {f"{name}{kind}": [] for name in models for kind in ("", "_prefill")}
        for _ in range(repeats):
            for name, model in models.items():
                seconds, tokens[name] = _decode(model, ids, new_tokens)
                times[name].append(seconds)
                if prefill_tokens:
                    times[f"{name}_prefill"].append(_forward(model, prefill))
        out = {"checkpoint": checkpoint, "world": world, "dtype": str(dtype).removeprefix("torch."),
               "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
               "prefill_tokens": prefill_tokens, "patterns": list(patterns), "ks": list(ks)}
        for key, unit in (("", "_s_per_token"), ("_prefill", "_s")):
            if times[f"plain{key}"]:
                for name in models:
                    out[f"{name}{key}{unit}"] = max(all_ranks(statistics.median(times[f"{name}{key}"])))
                for name in models:
                    if name != "plain":
                        out[f"{name}{key}_over_plain"] = out[f"{name}{key}{unit}"] / out[f"plain{key}{unit}"]
        out["same_tokens"] = all(all_ranks(all(torch.equal(t, tokens["plain"]) for t in tokens.values())))
        out["held_bytes"] = {name: all_ranks(model.provider.nbytes()["masters"]) for name, model in models.items()}
        out["window_bytes"] = {name: all_ranks(model.provider.nbytes()["work"]) for name, model in models.items()
                               if name != "plain"}
        out["shared_provider"] = type(models["shared"].provider).__name__
        return out
    finally:
        for model in models.values():
            model.close()


@contextlib.contextmanager
def _broadcasting() -> Iterator[None]:
    """Loads in this block broadcast their series layers, as on ranks of different hosts: SHARDWISE_SHM=0."""
    old = os.environ.get("SHARDWISE_SHM")
    os.environ["SHARDWISE_SHM"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SHARDWISE_SHM"]
        else:
            os.environ["SHARDWISE_SHM"] = old


def _forward(model: Model, ids: torch.Tensor) -> float:
    """Seconds for one forward over ``ids`` (a prefill), after a barrier."""
    barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.forward(ids)
    return time.perf_counter() - t0


def _decode(model: Model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds per decoded token (first new token to last), and the tokens generated."""
    stamps: list[float] = []
    barrier()
    out = model.generate(ids, new_tokens, on_token=lambda _: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), out
