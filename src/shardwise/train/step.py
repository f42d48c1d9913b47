"""One training step on any TP x DP x EP layout, resident or ZeRO-3: forward, backward, reductions, clipping, update.

The loss of a step is the mean next-token cross-entropy over the *global* batch, computed
vocab-parallel from each TP rank's slice of the logits (``loss``): each DP rank sums its
own tokens' losses and divides by the global token count, so summing the ranks'
gradients over DP gives the gradient of that one mean whatever the split, even an uneven
one, and micro-batches (gradient accumulation) simply add up.

What a step trains is a ``Trained``: the model's own weights (``weights.WeightTraining``) or
a prompt table in front of a frozen model (``prompt_tuning.PromptTuning``). The walk is the
same for both; they differ in which gradients the walk makes, how those are reduced, and
what the update changes.

The step walks the provider's blocks, as the forward does, and then walks them back:
- **resident**: the forward keeps each block's graph (its input detached at the block
  boundary), and the backward runs block by block.
- **zero3**: a block's weights are gone once it is released, so the forward runs without
  a graph, keeping only each block's input, and the backward gathers the blocks again in
  reverse (``stream`` prefetches block l-1 while block l runs) and recomputes each block,
  with its gathered tensors as leaves when their gradients are wanted.

Within TP and EP the collectives carry their backward. Clipping scales by
``max_grad_norm / norm`` as torch's ``clip_grad_norm_`` does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ..model.forward import Model
from ..model.pipeline import Pass, run_block
from ..plan.names import HEAD, Block
from .balance import Balance
from .loss import vocab_parallel_cross_entropy
from .optim import AdamW
from .weights import WeightTraining

log = logging.getLogger(__name__)

TRAINABLE = ("resident", "zero3")


@dataclass(frozen=True)
class StepResult:
    """What a step reports, the same on every rank: the global mean loss and the gradient norm before clipping."""

    loss: float
    grad_norm: float


class Trained(Protocol):
    """What a step updates, and the hooks the walk calls on it."""

    weight_grads: bool  # whether the walk makes the weights' gradients (False: the model is frozen)
    lr: float  # the learning rate of the next update, which a schedule sets before each step
    prefix: torch.Tensor | None  # ids every row starts with (a prompt table's virtual tokens), predicting nothing

    def reduce(self, block: Block, w: dict[str, torch.Tensor], last: bool) -> None:
        """After ``block``'s backward: reduce what it produced (``last``: of the step's last micro-batch)."""

    def squared_norm(self) -> float:
        """Once the micro-batches are done: the squared global norm of the reduced gradients."""

    def scale(self, factor: float) -> None:
        """Scale the gradients (clipping)."""

    def update(self) -> None:
        """Take the optimizer step and zero the gradients."""

    def nbytes(self) -> dict[str, int]:
        """Bytes held by role."""

    def close(self) -> None:
        """Free what construction created (collective)."""


class Trainer:
    """Trains what ``trains`` says of ``model`` in place; construction is collective (training the weights creates
    the reduction groups)."""

    def __init__(self, model: Model, trains: AdamW | Trained, max_grad_norm: float | None = None):
        """``trains``: AdamW over the model's masters, or a ``Trained`` (a prompt table: the model frozen)."""
        plan = model.plan
        if plan.provider not in TRAINABLE:
            raise NotImplementedError(f"rank {plan.rank}: training runs on provider {' or '.join(TRAINABLE)}, not "
                                      f"{plan.provider!r}")
        if plan.layout.pp > 1:
            raise NotImplementedError(f"rank {plan.rank}: training over pipeline stages (pp={plan.layout.pp}) is "
                                      "not built yet: use pp=1")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.model, self.max_grad_norm = model, max_grad_norm
        self.target: Trained = WeightTraining(model, trains) if isinstance(trains, AdamW) else trains
        self.recompute = plan.provider == "zero3"
        coef = plan.spec.aux_loss_coef
        self.balance = Balance(model, coef) if coef and plan.spec.sparse else None
        if plan.spec.router_jitter and plan.rank == 0:
            log.warning("config.json sets router_jitter_noise=%g: HF's training multiplies each MoE layer's input by "
                        "random noise in [1 - %g, 1 + %g]; shardwise trains without it, so its steps are "
                        "deterministic and equal on every layout", *[plan.spec.router_jitter] * 3)

    def step(self, batches: list[torch.Tensor], global_tokens: int) -> StepResult:
        """Train on this DP rank's micro-batches (each (batch, seq) ids), then update once.

        ``global_tokens`` counts the predicted tokens of the whole step (every micro-batch of
        every DP rank). Under ZeRO-3 every DP rank must pass the same number of micro-batches.
        """
        if not batches:
            raise ValueError(f"rank {self.model.plan.rank}: a step needs at least one micro-batch")
        loss = sum(self._micro_batch(ids, global_tokens, i == len(batches) - 1, len(batches))
                   for i, ids in enumerate(batches))
        norm = math.sqrt(self.target.squared_norm())
        loss = self.model.comm.token_sum(loss.reshape(1))
        if self.max_grad_norm is not None and norm + 1e-6 > self.max_grad_norm:
            self.target.scale(self.max_grad_norm / (norm + 1e-6))
        self.target.update()
        return StepResult(float(loss), norm)

    def nbytes(self) -> dict[str, int]:
        """Bytes this training holds by role (for the model's weights: as ``weights.training_memory`` plans them)."""
        return self.target.nbytes()

    def _micro_batch(self, ids: torch.Tensor, global_tokens: int, last: bool, micro_batches: int) -> torch.Tensor:
        """Forward and backward of one micro-batch; its share of the global mean loss (detached), a mixture of
        experts' balancing loss included (see ``balance``)."""
        model, provider, keep, target = self.model, self.model.provider, not self.recompute, self.target
        rows = model.plan.batch_rows(ids.shape[0])
        ids = ids[rows.start:rows.stop].to(model.device)
        first = 0  # the position predicting ids[:, 1]; after a prefix, the prefix's last predicts ids[:, 0]
        if target.prefix is not None:
            first = len(target.prefix) - 1
            ids = torch.cat([target.prefix.to(ids.device).expand(len(ids), -1), ids], dim=1)
        p = Pass(ids, *model.rope(torch.arange(ids.shape[1], device=model.device)))

        def head(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = model.head(x[:, first:-1], w, local_vocab=True)  # the last position predicts nothing
            start, group = model.vocab_slice
            return vocab_parallel_cross_entropy(logits, ids[:, first + 1:], start, group,
                                                reduction="sum") / global_tokens  # fp32, whatever the work dtype

        def run(block: Block, x: torch.Tensor | None, w: dict[str, torch.Tensor]) -> torch.Tensor:
            return run_block(model, block, x, w, p, head)

        blocks = list(model.plan.blocks)
        ahead = blocks if keep else blocks[:-1]  # without a graph to keep, the head runs once, in the backward
        saved: list[tuple[Block, torch.Tensor | None, torch.Tensor | None]] = []
        h = None
        with provider.stream(ahead) as weights, torch.set_grad_enabled(keep):
            for block, w in zip(ahead, weights):
                x = None if h is None else h.detach().requires_grad_(keep)
                h = run(block, x, w)
                saved.append((block, x, h if keep else None))
        if not keep:
            saved.append((blocks[-1], h.detach(), None))
        balance = None if self.balance is None else self.balance.count(micro_batches)

        grad, loss = None, None
        with provider.stream([block for block, _, _ in reversed(saved)]) as weights:
            for (block, x, out), w in zip(reversed(saved), weights):
                if not keep:
                    w = {k: t.detach().requires_grad_(target.weight_grads) for k, t in w.items()}
                    with torch.enable_grad():
                        out = run(block, None if x is None else x.requires_grad_(), w)
                if block == HEAD:
                    loss = out.detach()
                    out.backward()
                elif out.requires_grad:  # not so only for the embedding of a frozen model's rank without rows
                    term = None if balance is None or block.layer is None else self.balance.term(block.layer)
                    torch.autograd.backward([out] if term is None else [out, term],
                                            [grad] if term is None else [grad, None])
                grad = None if x is None else x.grad
                target.reduce(block, w, last)
        return loss if balance is None else loss + balance

    def close(self) -> None:
        self.target.close()
