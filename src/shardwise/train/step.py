"""One training step on any TP x DP layout, resident or ZeRO-3: forward, backward, reductions, clipping, AdamW.

The loss of a step is the mean next-token cross-entropy over the *global* batch, computed
vocab-parallel from each TP rank's slice of the logits (``loss``): each DP rank sums its
own tokens' losses and divides by the global token count, so summing the ranks'
gradients over DP gives the gradient of that one mean whatever the split, even an uneven
one, and micro-batches (gradient accumulation) simply add up.

The step walks the provider's blocks, as the forward does, and then walks them back:
- **resident**: the forward keeps each block's graph (its input detached at the block
  boundary), and the backward runs block by block into gradient buffers laid out like
  the weights' buffers, so a tied embedding and LM head on one stage are one tensor.
- **zero3**: a block's weights are gone once it is released, so the forward runs without
  a graph, keeping only each block's input, and the backward gathers the blocks again in
  reverse (``stream`` prefetches block l-1 while block l runs), recomputes the block with
  its gathered tensors as leaves, and sums their gradients over DP into this rank's
  master chunk (``grads.DpGradReducer``): ZeRO-3's reduce-scatter.

With offload the gradient sums, like the masters and AdamW's moments, live in host memory
(``Provider.state_device``), so the device holds only what the block at hand needs.

Within TP and EP the collectives carry their backward and ``PartialGradReducer`` sums the
regions the plan finds partial. The global gradient norm counts each element once, on the rank that
owns it (``RankPlan.owned``), and clipping scales by ``max_grad_norm / norm`` as torch's
``clip_grad_norm_`` does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..model.forward import Model
from ..model.pipeline import Pass, run_block
from ..plan.names import HEAD, Block
from ..plan.rank import RankPlan
from ..providers.base import short_names
from ..providers.weights import allocate
from ..providers.zero3 import memory_plan
from .balance import Balance
from .grads import DpGradReducer, PartialGradReducer
from .loss import vocab_parallel_cross_entropy
from .optim import MOMENTS, AdamW

log = logging.getLogger(__name__)

TRAINABLE = ("resident", "zero3")
FP32 = torch.float32.itemsize


def training_memory(plan: RankPlan, work_dtype: torch.dtype | None = None, prefetch: int = 1,
                    offload: bool = False) -> dict[str, int]:
    """Bytes a rank's training holds by role, what ``Trainer.nbytes`` measures after a step (activations aside).

    The fp32 masters, their gradient sums and AdamW's moments are each laid out like the
    masters; under ZeRO-3 come its work buffers and staging (``memory_plan``, as for gloo
    gathers), the two buffers a block's gradients are summed in over DP (a whole block, and
    this rank's chunk) and, with offload, the device's copy of one block's moments and gradient.
    """
    numel = [b.numel for b in plan.buffers]
    held = sum(numel) * FP32
    out = {"masters": held, "gradients": held, "moments": len(MOMENTS) * held, "work": 0, "staging": 0}
    if plan.provider == "zero3":
        memory = memory_plan(plan, torch.float32, work_dtype, prefetch, offload)
        flats = plan.flats.values()
        summed = (max(f.parts * f.chunk for f in flats) + max(f.chunk for f in flats)) * FP32
        staged = (len(MOMENTS) + 1) * max(numel) * FP32 if offload else 0
        out |= {"work": memory["work"], "staging": memory["staging"] + summed + staged}
    return out


@dataclass(frozen=True)
class StepResult:
    """What a step reports, the same on every rank: the global mean loss and the gradient norm before clipping."""

    loss: float
    grad_norm: float


class Trainer:
    """Trains ``model``'s masters in place; construction is collective (it creates the reduction groups)."""

    def __init__(self, model: Model, optimizer: AdamW, max_grad_norm: float | None = None):
        plan = model.plan
        if plan.provider not in TRAINABLE:
            raise NotImplementedError(f"rank {plan.rank}: training runs on provider {' or '.join(TRAINABLE)}, not "
                                      f"{plan.provider!r}")
        if plan.layout.pp > 1:
            raise NotImplementedError(f"rank {plan.rank}: training over pipeline stages (pp={plan.layout.pp}) is "
                                      "not built yet: use pp=1")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.model, self.optimizer, self.max_grad_norm = model, optimizer, max_grad_norm
        self.recompute = plan.provider == "zero3"
        provider = model.provider  # the gradient sums scale with the masters: they live where those do
        self.flats, self.grads = allocate(plan, [torch.float32] * len(plan.buffers), provider.state_device,
                                          provider.state_pinned)
        if not self.recompute:
            for name, t in provider.tensors.items():
                if t.grad is None:
                    t.requires_grad_()
                    t.grad = self.grads[name]
        self.partial = PartialGradReducer(plan)
        self.dp = DpGradReducer(plan, model.comm, self.flats, model.device)
        self.owned = [(self.grads[name], box.local_index()) for name, box in plan.owned()]
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
        self.dp.wait()
        loss = self.model.comm.token_sum(loss.reshape(1))
        norm = self._clip()
        self.optimizer.step(self.flats if self.recompute else self.grads)
        for flat in self.flats.values():
            flat.zero_()
        return StepResult(float(loss), norm)

    def nbytes(self) -> dict[str, int]:
        """Bytes this training holds by role, as ``training_memory`` plans them."""
        held, optimizer = self.model.provider.nbytes(), self.optimizer.nbytes()
        return {"masters": held["masters"], "gradients": sum(t.nbytes for t in self.flats.values()),
                "moments": optimizer["moments"], "work": held["work"],
                "staging": held["staging"] + self.dp.nbytes() + optimizer["staging"]}

    def _micro_batch(self, ids: torch.Tensor, global_tokens: int, last: bool, micro_batches: int) -> torch.Tensor:
        """Forward and backward of one micro-batch; its share of the global mean loss (detached), a mixture of
        experts' balancing loss included (see ``balance``)."""
        model, provider, keep = self.model, self.model.provider, not self.recompute
        rows = model.plan.batch_rows(ids.shape[0])
        ids = ids[rows.start:rows.stop].to(model.device)
        p = Pass(ids, *model.rope(torch.arange(ids.shape[1], device=model.device)))

        def head(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = model.head(x[:, :-1], w, local_vocab=True)  # the last position predicts nothing
            start, group = model.vocab_slice
            return vocab_parallel_cross_entropy(logits, ids[:, 1:], start, group,
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
                    w = {k: t.detach().requires_grad_() for k, t in w.items()}
                    with torch.enable_grad():
                        out = run(block, None if x is None else x.requires_grad_(), w)
                if block == HEAD:
                    loss = out.detach()
                    out.backward()
                else:
                    term = None if balance is None or block.layer is None else self.balance.term(block.layer)
                    torch.autograd.backward([out] if term is None else [out, term],
                                            [grad] if term is None else [grad, None])
                grad = None if x is None else x.grad
                self._reduce(block, w, last)
        return loss if balance is None else loss + balance

    def _reduce(self, block: str, w: dict[str, torch.Tensor], last: bool) -> None:
        """Sum a block's gradients as the plan says: TP and EP partial regions, then over DP.

        Resident gradients accumulate in place over micro-batches and are reduced once, after
        the last; ZeRO-3 gradients are fresh per micro-batch and go home to the masters each time.
        """
        plan = self.model.plan
        if self.recompute:
            grads = {name: w[short].grad for name, short in short_names(plan, block).items()}
            self.partial.reduce(grads)
            self.dp.scatter(grads)
        elif last:
            self.partial.reduce({name: self.grads[name] for name in plan.blocks[block] if name not in plan.alias})
            self.dp.all_reduce(block)

    def _clip(self) -> float:
        """The global gradient norm, each element counted once over the world; scales the gradients to
        ``max_grad_norm`` when it is exceeded."""
        squares = torch.zeros(1, dtype=torch.float64, device=self.model.device)
        for grad, index in self.owned:
            squares += grad[index].double().pow(2).sum()
        if dist.is_initialized() and self.model.comm.layout.world_size > 1:
            dist.all_reduce(squares)
        norm = math.sqrt(float(squares))
        if self.max_grad_norm is not None:
            scale = min(1.0, self.max_grad_norm / (norm + 1e-6))
            if scale < 1.0:
                for flat in self.flats.values():
                    flat.mul_(scale)
        return norm

    def close(self) -> None:
        self.partial.close()
