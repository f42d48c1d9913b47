"""The block walk of one pipeline stage, written once for inference and training.

A stage receives the hidden state from the previous stage (the first embeds the ids
instead), runs its blocks as the provider hands their weights out, and sends the result
on (the last ends it with the head). ``run_block`` is the one place that knows what each
block does; inference (``Model.forward``) walks the blocks with ``walk``, and training
(``train.step``) calls ``run_block`` per block too, keeping each block's input for its
backward and ending with the loss instead of the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..plan.names import EMBED, HEAD, Block

if TYPE_CHECKING:
    from .forward import KVCache, Model

Head = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Pass:
    """What every block of one forward pass needs besides its weights and the hidden state: the ids (for the
    embedding), rope's cos and sin, the first position, the KV caches (None: no cache), padded keys, and under
    sequence parallelism every TP rank's token count (``Model.token_counts``)."""

    ids: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    start: int = 0
    caches: dict[int, KVCache] | None = None
    keys: torch.Tensor | None = None
    seq: list[int] | None = None

    def hidden_shape(self, model: Model) -> tuple[int, int, int]:
        """The shape of the hidden state between blocks on this rank: its tokens only under sequence parallelism."""
        b, t = self.ids.shape
        return b, t if self.seq is None else self.seq[model.plan.tp_rank], model.spec.hidden


def run_block(model: Model, block: Block, h: torch.Tensor | None, w: dict[str, torch.Tensor], p: Pass,
              head: Head) -> torch.Tensor:
    """One block: the embedding looks the ids up, a decoder layer transforms ``h``, ``head`` ends the pass."""
    if block == EMBED:
        return model.embed(p.ids, w, p.seq)
    if block == HEAD:
        return head(h, w)
    n = block.layer
    return model.layers[n](h, w, p.cos, p.sin, p.start, None if p.caches is None else p.caches[n], p.keys, p.seq)


def walk(model: Model, p: Pass, head: Head) -> torch.Tensor | None:
    """This stage's part of a forward pass: ``head``'s output on the last stage, None on the others (whose hidden
    state went on to the next stage)."""
    plan, blocks = model.plan, list(model.plan.blocks)
    with model.provider.stream(blocks) as weights:
        h = None
        if not plan.is_first:
            h = model.comm.recv_prev(torch.empty(p.hidden_shape(model), dtype=model.dtype, device=model.device))
        for block, w in zip(blocks, weights):
            h = run_block(model, block, h, w, p, head)
    if plan.is_last:
        return h
    model.comm.send_next(h)
    return None
