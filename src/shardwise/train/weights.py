"""Training the model's own weights: gradient sums laid out like the masters, reduced as the plan says, AdamW.

The gradient sums are laid out like the plan's buffers (``providers.weights.allocate``), in fp32,
where the masters live (``Provider.state_device``): host memory with offload.
- **resident**: each held tensor is a leaf whose ``.grad`` is its view of the sums, so a
  tied embedding and LM head on one stage are one tensor, and micro-batches accumulate
  in place; after the last, a block's partial regions are summed over TP and EP and its
  buffers all-reduced over DP while the blocks below still run backward.
- **zero3**: a block's gradients are fresh per recomputation and go home to this rank's
  master chunk at once (``grads.DpGradReducer``): ZeRO-3's reduce-scatter.

Over pipeline stages, a tensor two stages hold (a tied embedding and LM head) has its
gradient summed between them at the step's end (``grads.stage_partials``). The global
gradient norm counts each element once, on the rank that owns it (``RankPlan.owned``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.forward import Model
from ..plan.names import Block
from ..plan.rank import RankPlan
from ..providers.base import short_names
from ..providers.weights import allocate
from ..providers.zero3 import memory_plan
from .grads import DpGradReducer, PartialGradReducer, stage_partials
from .optim import MOMENTS, AdamW

FP32 = torch.float32.itemsize


def training_memory(plan: RankPlan, work_dtype: torch.dtype | None = None, prefetch: int = 1,
                    offload: bool = False) -> dict[str, int]:
    """Bytes a rank's training holds by role, what ``Trainer.nbytes`` measures after a step (activations aside).

    The fp32 masters, their gradient sums and AdamW's moments are each laid out like the
    masters; under ZeRO-3 come its work buffers and staging (``memory_plan``, as for gloo
    gathers), the buffer a block's gradients are summed in over DP (a whole block) and, with
    offload, the device's copy of one block's moments and gradient.
    """
    numel = [b.numel for b in plan.buffers]
    held = sum(numel) * FP32
    out = {"masters": held, "gradients": held, "moments": len(MOMENTS) * held, "work": 0, "staging": 0}
    if plan.provider == "zero3":
        memory = memory_plan(plan, torch.float32, work_dtype, prefetch, offload)
        flats = plan.flats.values()
        summed = max(f.parts * f.chunk for f in flats) * FP32
        staged = (len(MOMENTS) + 1) * max(numel) * FP32 if offload else 0
        out |= {"work": memory["work"], "staging": memory["staging"] + summed + staged}
    return out


class WeightTraining:
    """The model's masters as what a step trains; construction is collective (it creates the reduction groups)."""

    weight_grads = True
    prefix = None

    def __init__(self, model: Model, optimizer: AdamW):
        plan, provider = model.plan, model.provider
        self.model, self.optimizer = model, optimizer
        self.recompute = plan.provider == "zero3"
        self.flats, self.grads = allocate(plan, [torch.float32] * len(plan.buffers), provider.state_device,
                                          provider.state_pinned)
        if not self.recompute:
            for name, t in provider.tensors.items():
                if t.grad is None:
                    t.requires_grad_()
                    t.grad = self.grads[name]
        self.partial = PartialGradReducer(plan)
        self.tied = PartialGradReducer(plan, stage_partials)
        self.tied_names = {p.name for p in self.tied.partials}
        self.tied_sums: dict[str, torch.Tensor] = {}  # ZeRO-3: a tied tensor's work gradient over the step
        self.dp = DpGradReducer(plan, model.comm, self.flats, model.device)
        self.owned = [(self.grads[name], box.local_index()) for name, box in plan.owned()]

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.lr = value

    def reduce(self, block: Block, w: dict[str, torch.Tensor], last: bool) -> None:
        """Sum a block's gradients as the plan says: TP and EP partial regions, then over DP.

        Resident gradients accumulate in place over micro-batches and are reduced once, after
        the last; ZeRO-3 gradients are fresh per micro-batch and go home to the masters each time.
        """
        plan = self.model.plan
        if self.recompute:
            grads = {name: w[short].grad for name, short in short_names(plan, block).items()}
            self.partial.reduce(grads)
            for name in self.tied_names & grads.keys():  # summed with the other stage's at the step's end
                grad = grads.pop(name)
                self.tied_sums[name] = self.tied_sums[name] + grad if name in self.tied_sums else grad.clone()
            self.dp.scatter(grads)
        elif last:
            self.partial.reduce({name: self.grads[name] for name in plan.blocks[block] if name not in plan.alias})
            self.dp.all_reduce(block)

    def squared_norm(self) -> float:
        """The squared global gradient norm, once every reduction has landed: each element counted once."""
        self.dp.wait()
        self._sum_tied()
        squares = torch.zeros(1, dtype=torch.float64, device=self.model.device)
        for grad, index in self.owned:
            squares += grad[index].double().pow(2).sum()
        if dist.is_initialized() and self.model.comm.layout.world_size > 1:
            dist.all_reduce(squares)
        return float(squares)

    def _sum_tied(self) -> None:
        """Sum a tensor's gradient between the pipeline stages that hold it (a tied embedding and LM head), once
        every micro-batch is done: a stage that waited for it earlier would wait on a peer still running backward
        through the micro-batch it needs. ZeRO-3's sums then go home to the masters over DP."""
        if not self.tied_names:
            return
        if not self.recompute:
            self.tied.reduce({name: self.grads[name] for name in self.tied_names})
            return
        self.tied.reduce(self.tied_sums)
        self.dp.scatter(self.tied_sums)
        self.tied_sums = {}

    def scale(self, factor: float) -> None:
        for flat in self.flats.values():
            flat.mul_(factor)

    def update(self) -> None:
        self.optimizer.step(self.flats if self.recompute else self.grads)
        for flat in self.flats.values():
            flat.zero_()

    def nbytes(self) -> dict[str, int]:
        held, optimizer = self.model.provider.nbytes(), self.optimizer.nbytes()
        return {"masters": held["masters"], "gradients": sum(t.nbytes for t in self.flats.values()),
                "moments": optimizer["moments"], "work": held["work"],
                "staging": held["staging"] + self.dp.nbytes() + optimizer["staging"]}

    def close(self) -> None:
        self.partial.close()
        self.tied.close()
        self.dp.close()
