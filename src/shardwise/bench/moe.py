"""``shardwise bench moe``: prefill and decode tokens/s of a mixture of experts, at EP N against EP 1 and HF.

A batch of 32 sequences keeps every expert busy at each decode step (32 tokens x top-k
choices), so a step streams every expert's bytes: at EP N each rank streams 1/N of them,
and runs attention, the router and the LM head on its 1/N of the rows. Decode is timed as
the difference between generating N+1 tokens and 1 (the prefill and the first token), so
it counts decode steps alone; prefill is one forward over the prompts.

What EP can divide is the experts' work, and what it adds is its all-to-alls, so the bench
also splits a decode step (``experts_s``): the time the slowest rank spends computing its
experts, timed in the model itself on the same prompts, and the rest; and times
one all-to-all of a step's rows alone (``exchange_time``), of which each sparse layer makes
two (the rows out, with their counts per expert, and their outputs back).
"""

from __future__ import annotations

import time

import torch

from ..dist.collectives import all_to_all_rows
from ..dist.comm import make_comm
from ..io.loader import load_model
from ..model.moe import MoE
from ..plan.boxes import split_evenly
from ..plan.mesh import Layout
from ..plan.rank import batch_shares
from ..plan.spec import load_spec
from .measure import all_ranks, barrier
from .rates import REPEATS, hf_generate, prompts, rates

BATCH, PROMPT = 32, 64


def bench_moe_rank(directory: str, layout: Layout, dtype: torch.dtype, new_tokens: int, batch: int = BATCH) -> dict:
    """shardwise's rates under ``layout`` (every rank times the same calls; rank 0's row is returned), and
    ``experts_s``: the seconds per decode step the slowest rank spends computing its experts in those runs
    (``MoE.compute``, each sparse layer's timed by a wrapper: the rows grouped by expert, the grouped matmuls and
    SwiGLU, the rows put back)."""
    ids = prompts(directory, batch, PROMPT)
    clock = [0.0]

    def timed(compute):
        def run(*args):
            t0 = time.perf_counter()
            try:
                return compute(*args)
            finally:
                clock[0] += time.perf_counter() - t0
        return run

    with load_model(directory, layout, dtype=dtype, progress=False) as model:
        for layer in model.layers.values():
            if isinstance(layer.mlp, MoE):
                layer.mlp.compute = timed(layer.mlp.compute)
        row = rates(model, model.generate, ids, new_tokens, clock)
    row["experts_s"] = max(all_ranks(row.pop("part_s")))
    return {"ep": layout.ep, "tp": layout.tp, "batch": batch, "prompt_tokens": PROMPT, "new_tokens": new_tokens,
            **row}


def bench_moe_hf(directory: str, dtype: torch.dtype, new_tokens: int, batch: int = BATCH) -> dict:
    """HF's model in this one process, the same prompts and calls."""
    import transformers

    ids = prompts(directory, batch, PROMPT)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    return {"batch": batch, "prompt_tokens": PROMPT, "new_tokens": new_tokens,
            **rates(lambda x: model(x).logits, hf_generate(model), ids, new_tokens)}


def ceiling(split: dict, whole: dict) -> float | None:
    """How much faster EP N (``split``'s row) would decode than EP 1 (``whole``'s) if everything but the experts cost
    it what it costs EP 1, with no exchange and no wait: EP 1's step over (EP 1's step less its experts plus EP N's
    experts). None when a decode was too short to time."""
    if split["decode_tok_s"] is None or whole["decode_tok_s"] is None:
        return None
    step = whole["batch"] / whole["decode_tok_s"]
    return step / (step - whole["experts_s"] + split["experts_s"])


def exchange_time(directory: str, layout: Layout, dtype: torch.dtype, batch: int = BATCH) -> float:
    """Seconds of one all-to-all of a decode step's rows on the slowest rank, the best of ``REPEATS`` x 3: each
    rank's ``batch / ep x top_k`` rows spread evenly over the ranks, through the transport the model uses (shared
    memory on one x86 host, else gloo)."""
    spec = load_spec(directory)
    rank = torch.distributed.get_rank()
    # each rank's rows spread evenly over the ranks (a rank without rows of the batch sends none)
    spread = [[hi - lo for lo, hi in split_evenly(len(rows) * spec.top_k, layout.ep)]
              for rows in batch_shares(batch, layout)]
    me = layout.ep_rank(rank)
    send, receive = spread[me], [sizes[me] for sizes in spread]
    rows = torch.randn(sum(send), spec.hidden, dtype=dtype)
    comm = make_comm(layout)
    try:
        return _slowest(lambda: all_to_all_rows(rows, send, receive, comm.ep_group, comm.ep_shm))
    finally:
        comm.close()


def _slowest(run) -> float:
    """The best time of ``run`` over ``REPEATS`` x 3 tries, each the slowest rank's (every rank runs it at once)."""
    run()
    best = float("inf")
    for _ in range(REPEATS * 3):
        barrier()
        t0 = time.perf_counter()
        run()
        best = min(best, max(all_ranks(time.perf_counter() - t0)))
    return best
