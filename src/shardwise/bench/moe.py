"""``shardwise bench moe``: prefill and decode tokens/s of a mixture of experts, at EP N against EP 1 and HF.

A batch of 32 sequences keeps every expert busy at each decode step (32 tokens x top-k
choices), so a step streams every expert's bytes: at EP N each rank streams 1/N of them,
and runs attention, the router and the LM head on its 1/N of the rows. Decode is timed as
the difference between generating N+1 tokens and 1 (the prefill and the first token), so
it counts decode steps alone; prefill is one forward over the prompts.
"""

from __future__ import annotations

import time

import torch

from ..io.loader import load_model
from ..plan.mesh import Layout
from ..plan.spec import load_spec
from .measure import barrier

BATCH, PROMPT = 32, 64
REPEATS = 3  # each rate is the best of these


def prompts(directory: str, batch: int, length: int) -> torch.Tensor:
    """The same random prompts everywhere (seeded), from the model's vocabulary."""
    return torch.randint(0, load_spec(directory).vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _rates(forward, generate, ids: torch.Tensor, new_tokens: int) -> dict:
    """Prefill and decode tokens/s of ``forward(ids)`` and ``generate(ids, n)``, each the best of ``REPEATS``."""
    generate(ids[:, :8], 2)  # warm-up: first-call allocations and thread pools
    timings: dict[str, list[float]] = {"prefill": [], "first": [], "all": []}
    for _ in range(REPEATS):
        for key, run in (("prefill", lambda: forward(ids)), ("first", lambda: generate(ids, 1)),
                         ("all", lambda: generate(ids, new_tokens + 1))):
            barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                run()
            timings[key].append(time.perf_counter() - t0)
    b, t = ids.shape
    decode = min(timings["all"]) - min(timings["first"])
    return {"prefill_tok_s": b * t / min(timings["prefill"]), "decode_tok_s": b * new_tokens / decode}


def bench_moe_rank(directory: str, layout: Layout, dtype: torch.dtype, new_tokens: int, batch: int = BATCH) -> dict:
    """shardwise's rates under ``layout`` (every rank times the same calls; rank 0's row is returned)."""
    ids = prompts(directory, batch, PROMPT)
    with load_model(directory, layout, dtype=dtype, progress=False) as model:
        row = _rates(model, model.generate, ids, new_tokens)
    return {"ep": layout.ep, "tp": layout.tp, "batch": batch, "prompt_tokens": PROMPT, "new_tokens": new_tokens,
            **row}


def bench_moe_hf(directory: str, dtype: torch.dtype, new_tokens: int, batch: int = BATCH) -> dict:
    """HF's model in this one process, the same prompts and calls."""
    import transformers

    ids = prompts(directory, batch, PROMPT)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()

    def generate(x: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    return {"batch": batch, "prompt_tokens": PROMPT, "new_tokens": new_tokens,
            **_rates(lambda x: model(x).logits, generate, ids, new_tokens)}
