"""Rank-side half of tests/test_grad.py: a TP model's local gradients against HF's, box by box."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import PROMPT

from shardwise import Layout, load_model
from shardwise.train.grads import PartialGradReducer


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), PROMPT[:, 1:].flatten())


@functools.cache
def hf_gradients(path: str) -> dict[str, torch.Tensor]:
    """HF's gradients computed in float64, so that a comparison measures shardwise's fp32 rounding alone: a q/k norm
    gain's gradient cancels heavily (softmax ignores a shift of the scores), and HF's own fp32 one can be 6e-6 off.
    The tests compute them once per checkpoint in their own process and hand them to the ranks, which then never
    import transformers."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    loss_of(model(PROMPT).logits).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    if model.config.tie_word_embeddings:
        grads["lm_head.weight"] = grads["model.embed_tokens.weight"]
    return grads


def tp_gradients(path: str, tp: int, reduce: bool = True,
                 expected: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Every rank's work tensors' largest gradient error relative to HF's largest (``expected``, from
    ``hf_gradients(path)``, computed here if not given), after (with ``reduce``) the partial regions the plan finds
    are summed over the ranks sharing them."""
    expected = expected or hf_gradients(path)
    with load_model(path, Layout(tp=tp), dtype=torch.float32, progress=False) as model:
        tensors = model.provider.tensors
        for t in {id(t): t for t in tensors.values()}.values():
            t.requires_grad_()
        loss_of(model.forward(PROMPT)).backward()
        grads = {name: t.grad for name, t in tensors.items()}
        if reduce:
            reducer = PartialGradReducer(model.plan)
            reducer.reduce(grads)
            reducer.close()
        out = {}
        for name, sharded in model.plan.work.items():
            if name in model.plan.alias:
                continue
            want = torch.zeros(sharded.shape)
            for box in sharded.boxes:
                want[box.local_index()] = expected[box.source][box.source_index()]
            got = grads[name]
            out[f"rank {model.comm.rank} {name}"] = float((got - want).abs().max() / want.abs().max())
    if not dist.is_initialized():
        return out
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, out)
    return {k: v for ranks in everyone for k, v in ranks.items()}
