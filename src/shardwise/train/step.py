"""One training step on any PP x TP x DP x EP layout, resident or ZeRO-3: forward, backward, reductions, clipping,
update.

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

Over pipeline stages each stage walks its own blocks, receiving the hidden state from the
previous stage and sending it on, and in the backward receiving its gradient from the next
stage and sending the input's gradient back; the micro-batches run in 1F1B order
(``Trainer._schedule``). Within TP and EP the collectives carry their backward. Clipping
scales by ``max_grad_norm / norm`` as torch's ``clip_grad_norm_`` does.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from ..model.forward import Model
from ..model.pipeline import Head, Pass, run_block
from ..plan.names import HEAD, Block
from .balance import Balance
from .loss import vocab_parallel_cross_entropy
from .optim import AdamW
from .weights import WeightTraining

log = logging.getLogger(__name__)

TRAINABLE = ("resident", "zero3")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@dataclass(frozen=True)
class StepResult:
    """What a step reports, the same on every rank: the global mean loss and the gradient norm before clipping."""

    loss: float
    grad_norm: float


FORWARD, BACKWARD = 0, 1  # the tags of activations and of their gradients between pipeline stages


@dataclass
class Flight:
    """A micro-batch between its forward and its backward on this stage: the pass, its head, each block with its
    input (and, resident, its output, whose graph the backward runs), the shape of what crosses to the next stage,
    and this rank's share of the balancing loss."""

    p: Pass
    head: Head
    saved: list[tuple[Block, torch.Tensor | None, torch.Tensor | None]]
    shape: tuple[int, ...]
    balance: torch.Tensor | None


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


def keep_freed_heap() -> None:
    """Have glibc keep this process's freed memory for the next allocation of its size instead of returning it to
    the kernel (a no-op off glibc).

    A training step allocates the same large tensors as the step before (activations, the
    gathered tokens, the logits, the collectives' buffers) and frees them all by its end. By
    default glibc gives each above an adaptive threshold (at most 32 MiB) fresh pages and trims
    the heap's free top, so every step pays a page fault per 4 KiB when they come back: at seq
    2048 on the 349M benchmark model, 30 000-150 000 faults and 0.5-3 s of a 37-39 s step spent
    in the kernel, measured. With allocations up to 256 MiB from the heap and up to 2 GiB of
    its free top kept, a step takes a handful. The process's peak is what the step needs either way; its
    memory between steps stays at that peak, as a GPU's caching allocator keeps it.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)  # mallopt's largest: 2 GiB of free top kept
    except (OSError, AttributeError):
        pass


class Trainer:
    """Trains what ``trains`` says of ``model`` in place; construction is collective (training the weights creates
    the reduction groups)."""

    def __init__(self, model: Model, trains: AdamW | Trained, max_grad_norm: float | None = None):
        """``trains``: AdamW over the model's masters, or a ``Trained`` (a prompt table: the model frozen)."""
        plan = model.plan
        if plan.provider not in TRAINABLE:
            raise NotImplementedError(f"rank {plan.rank}: training runs on provider {' or '.join(TRAINABLE)}, not "
                                      f"{plan.provider!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.model, self.max_grad_norm = model, max_grad_norm
        if model.device.type == "cpu":
            keep_freed_heap()
        self.target: Trained = WeightTraining(model, trains) if isinstance(trains, AdamW) else trains
        self.recompute = plan.provider == "zero3"
        coef = plan.spec.aux_loss_coef
        self.balance = Balance(model, coef) if coef and plan.spec.sparse else None
        if self.balance is not None and plan.layout.pp > 1:
            raise NotImplementedError(f"rank {plan.rank}: the balancing loss of {plan.spec.arch} (config.json's "
                                      "router_aux_loss_coef with output_router_logits) counts every layer's choices "
                                      "at once, which pipeline stages do not share: train it with pp=1")
        self.sent: list[dist.Work] = []  # sends to the neighbouring stages in flight, waited for at the step's end
        self.sent_tensors: list[torch.Tensor] = []
        self.waited = 0.0  # seconds spent waiting for a neighbouring stage, over every step: the pipeline's bubble
        if plan.spec.router_jitter and plan.rank == 0:
            log.warning("config.json sets router_jitter_noise=%g: HF's training multiplies each MoE layer's input by "
                        "random noise in [1 - %g, 1 + %g]; shardwise trains without it, so its steps are "
                        "deterministic and equal on every layout", *[plan.spec.router_jitter] * 3)

    def step(self, batches: list[torch.Tensor], global_tokens: int) -> StepResult:
        """Train on this DP rank's micro-batches (each (batch, seq) ids), then update once.

        ``global_tokens`` counts the predicted tokens of the whole step (every micro-batch of
        every DP rank). Under ZeRO-3 every DP rank must pass the same number of micro-batches,
        and over pipeline stages every stage the same ones.
        """
        if not batches:
            raise ValueError(f"rank {self.model.plan.rank}: a step needs at least one micro-batch")
        loss = self._schedule(batches, global_tokens)
        norm = math.sqrt(self.target.squared_norm())
        comm = self.model.comm
        loss = comm.from_last_stage(comm.token_sum(loss.reshape(1)), (1,), torch.float32, self.model.device)
        if self.max_grad_norm is not None and norm + 1e-6 > self.max_grad_norm:
            self.target.scale(self.max_grad_norm / (norm + 1e-6))
        self.target.update()
        return StepResult(float(loss), norm)

    def nbytes(self) -> dict[str, int]:
        """Bytes this training holds by role (for the model's weights: as ``weights.training_memory`` plans them)."""
        return self.target.nbytes()

    def _schedule(self, batches: list[torch.Tensor], global_tokens: int) -> torch.Tensor:
        """Every micro-batch's forward and backward in 1F1B order: stage s of P runs min(P - 1 - s, M) forwards
        ahead, then alternates one forward and one backward, then drains the backwards, so it holds at most P - s
        micro-batches' activations (one stage: each micro-batch's forward, then its backward). The sum of this rank's
        losses (zero off the last stage)."""
        plan, m = self.model.plan, len(batches)
        ahead = min(plan.layout.pp - 1 - plan.stage, m)
        flying: deque[Flight] = deque()
        loss = torch.zeros((), dtype=torch.float32, device=self.model.device)
        done = 0
        try:
            for i, ids in enumerate(batches):
                flying.append(self._forward(ids, global_tokens, m))
                if i >= ahead:
                    loss = loss + self._backward(flying.popleft(), done == m - 1)
                    done += 1
            while flying:
                loss = loss + self._backward(flying.popleft(), done == m - 1)
                done += 1
        finally:
            self._sent_wait()
        return loss

    def _sent_wait(self) -> None:
        start = time.perf_counter()
        for work in self.sent:
            work.wait()
        self.waited += time.perf_counter() - start
        self.sent, self.sent_tensors = [], []

    def _send(self, x: torch.Tensor, offset: int, tag: int) -> None:
        """Start sending ``x`` to this rank's peer ``offset`` stages on; it is waited for at the step's end, so a
        stage is never blocked on a peer still busy with another micro-batch."""
        if x.numel():
            x = x.detach().contiguous()
            self.sent.append(dist.isend(x, self.model.comm.stage_peer(offset), tag=tag))
            self.sent_tensors.append(x)

    def _recv(self, shape: tuple[int, ...], offset: int, tag: int) -> torch.Tensor:
        x = torch.empty(shape, dtype=self.model.dtype, device=self.model.device)
        if x.numel():
            start = time.perf_counter()
            dist.recv(x, self.model.comm.stage_peer(offset), tag=tag)
            self.waited += time.perf_counter() - start
        return x

    def _forward(self, ids: torch.Tensor, global_tokens: int, micro_batches: int) -> Flight:
        """One micro-batch's forward through this stage's blocks: each block's input kept (and, resident, its
        graph), the output sent on to the next stage."""
        model, provider, keep, target = self.model, self.model.provider, not self.recompute, self.target
        plan = model.plan
        rows = plan.batch_rows(ids.shape[0])
        ids = ids[rows.start:rows.stop].to(model.device)
        first = 0  # the position predicting ids[:, 1]; after a prefix, the prefix's last predicts ids[:, 0]
        if target.prefix is not None:
            first = len(target.prefix) - 1
            ids = torch.cat([target.prefix.to(ids.device).expand(len(ids), -1), ids], dim=1)
        p = Pass(ids, *model.rope(torch.arange(ids.shape[1], device=model.device)),
                 seq=model.token_counts(ids.shape[1]))

        def head(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = model.head(x, w, True, slice(first, -1), p.seq)  # the last position predicts nothing
            start, group = model.vocab_slice
            return vocab_parallel_cross_entropy(logits, ids[:, first + 1:], start, group,
                                                reduction="sum") / global_tokens  # fp32, whatever the work dtype

        shape = p.hidden_shape(model)
        h = None if plan.is_first else self._recv(shape, -1, FORWARD)
        blocks = list(plan.blocks)
        ahead = blocks[:-1] if plan.is_last and not keep else blocks  # without a graph, the head runs in backward
        saved: list[tuple[Block, torch.Tensor | None, torch.Tensor | None]] = []
        with provider.stream(ahead) as weights, torch.set_grad_enabled(keep):
            for block, w in zip(ahead, weights):
                x = None if h is None else h.detach().requires_grad_(keep)
                h = run_block(model, block, x, w, p, head)
                saved.append((block, x, h if keep else None))
        if plan.is_last and not keep:
            saved.append((blocks[-1], h.detach(), None))
        if not plan.is_last:
            self._send(h, 1, FORWARD)
        balance = None if self.balance is None else self.balance.count(micro_batches)
        return Flight(p, head, saved, shape, balance)

    def _backward(self, flight: Flight, last: bool) -> torch.Tensor:
        """One micro-batch's backward through this stage's blocks, from the loss on the last stage or the gradient
        the next stage sends; the input's gradient sent back to the previous stage. Its share of the global mean
        loss (detached; zero off the last stage), a mixture of experts' balancing loss included (``balance``)."""
        model, provider, keep, target = self.model, self.model.provider, not self.recompute, self.target
        plan = model.plan
        grad = None if plan.is_last else self._recv(flight.shape, 1, BACKWARD)
        loss = torch.zeros((), dtype=torch.float32, device=model.device)
        with provider.stream([block for block, _, _ in reversed(flight.saved)]) as weights:
            for (block, x, out), w in zip(reversed(flight.saved), weights):
                if not keep:
                    w = {k: t.detach().requires_grad_(target.weight_grads) for k, t in w.items()}
                    with torch.enable_grad():
                        out = run_block(model, block, None if x is None else x.requires_grad_(), w, flight.p,
                                        flight.head)
                if block == HEAD:
                    loss = out.detach()
                    out.backward()
                elif out.requires_grad:  # not so only for the embedding of a frozen model's rank without rows
                    term = None if flight.balance is None or block.layer is None else self.balance.term(block.layer)
                    torch.autograd.backward([out] if term is None else [out, term],
                                            [grad] if term is None else [grad, None])
                grad = None if x is None else x.grad
                target.reduce(block, w, last)
        if not plan.is_first:
            self._send(grad if grad is not None else torch.zeros(flight.shape, dtype=model.dtype,
                                                                 device=model.device), -1, BACKWARD)
        return loss if flight.balance is None else loss + flight.balance

    def close(self) -> None:
        self.target.close()
