"""``shardwise bench decode``: per-token decode time at batch 1, bf16 against int8 weight-only, with HF's peers.

Decoding one sequence streams every weight once per token, so its time is set by the bytes
read: int8 weight-only halves the projections' bytes. The same checkpoint runs under the
layout asked for in bf16 and int8 weight-only; HF's model runs in this one process in bf16
and, where torchao imports, with torchao's ``Int8WeightOnlyConfig`` on the same projections
(the LM head kept in bf16 as shardwise keeps it by default), all on the same prompt. Each
shardwise row also times the rank's projections alone, one token through every one of them:
what the matmul kernels give on these weights, apart from the rest of a step.
"""

from __future__ import annotations

import logging
import time

import torch

from ..io.loader import load_model
from ..model.layers import matmul
from ..model.weight_only import quantized
from ..plan.mesh import Layout
from .measure import all_ranks
from .rates import REPEATS, hf_generate, prompts, rates

PROMPT = 16
log = logging.getLogger("shardwise.bench")


def _row(name: str, measured: dict) -> dict:
    decode = measured["decode_tok_s"]
    return {"setting": name, "decode_tok_s": decode, "ms_per_token": None if decode is None else 1e3 / decode}


def bench_decode_rank(directory: str, layout: Layout, weight_only: str | None, new_tokens: int) -> dict:
    """shardwise in bf16 (``weight_only`` None) or int8 weight-only under ``layout`` (rank 0's row), and
    ``projections_s``: the seconds of one token's projection matmuls alone on the slowest rank."""
    ids = prompts(directory, 1, PROMPT)
    with load_model(directory, layout, dtype=torch.bfloat16, progress=False, weight_only=weight_only) as model:
        row = _row(f"shardwise {weight_only or 'bf16'}", rates(model, model.generate, ids, new_tokens))
        row["bytes"] = sum(model.provider.nbytes().values())
        row["projections_s"] = max(all_ranks(_projections(model)))
    return row | {"tp": layout.tp}


def _projections(model) -> float:
    """The best of ``REPEATS`` x 3 passes of one token (batch 1) through every projection this rank holds, one after
    the other as a decode step meets them (so each weight comes from memory, not cache, as in decoding): the kernel's
    own speed on these weights, with nothing else of a step."""
    weights = [model.provider.tensors[name] for name in quantized(model.plan, head=False)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=torch.bfloat16) for w in weights}
    best = float("inf")
    for _ in range(REPEATS * 3):
        t0 = time.perf_counter()
        for w in weights:
            matmul(inputs[w.shape[1]], w, None)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_decode_hf(directory: str, int8: bool, new_tokens: int) -> dict | None:
    """HF's model in bf16, or with torchao's int8 weight-only projections; None if torchao does not import."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    if int8:
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError as e:
            log.warning("torchao does not import here (%s): no torchao row", e)
            return None
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
                  and fqn != "lm_head")
    ids = prompts(directory, 1, PROMPT)
    return _row("hf torchao int8" if int8 else "hf bf16",
                rates(lambda x: model(x).logits, hf_generate(model), ids, new_tokens)) | {"tp": 1}
