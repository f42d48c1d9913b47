"""``shardwise bench generate``: greedy tokens/s of shardwise and of HF ``tp_plan="auto"``, side by side."""

from __future__ import annotations

import time

import torch

from ..io.loader import Provide, load_model
from ..plan.mesh import Layout
from .measure import barrier


def bench_generate_rank(directory: str, layout: Layout, prompt: str, new_tokens: int, with_hf: bool,
                        provide: Provide | None = None) -> dict:
    """Greedy fp32 throughput of shardwise and (optionally, on a TP-only layout) HF tp_plan="auto", same prompt,
    exactly N new tokens. Every DP replica generates the same prompt."""
    provide = provide or Provide()
    from ..model.text import TemplateError, Text

    text = Text(directory)
    try:
        ids = torch.tensor([text.prompt_ids(prompt, chat=True)])
    except TemplateError:  # a base model without a chat template gets the plain prompt
        ids = torch.tensor([text.prompt_ids(prompt, chat=False)])
    model = load_model(directory, layout, progress=False, **vars(provide))
    model.generate(ids, 2)  # warm-up: first-call allocations and thread pools
    barrier()
    t0 = time.perf_counter()
    out = model.generate(ids, new_tokens)
    row = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "provider": provide.provider,
           "prompt_tokens": ids.shape[1], "new_tokens": new_tokens,
           "shardwise_tok_s": new_tokens / (time.perf_counter() - t0),
           "shardwise_text": text.decode(out[0, ids.shape[1] :].tolist())}
    model.close()
    if with_hf and layout.world_size == layout.tp:
        row |= _hf_generate(directory, ids, new_tokens, layout.tp, text)
    return row


def _hf_generate(directory: str, ids: torch.Tensor, new_tokens: int, world: int, text) -> dict:
    import transformers

    kwargs = {"tp_plan": "auto"} if world > 1 else {}
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
        model.generate(ids, **settings | {"max_new_tokens": 2, "min_new_tokens": 2})
        barrier()
        t0 = time.perf_counter()
        out = model.generate(ids, **settings)
        seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - HF failing on a layout is itself a result worth reporting
        return {"hf_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {"hf_tok_s": new_tokens / seconds, "hf_text": text.decode(out[0, ids.shape[1] :].tolist())}
