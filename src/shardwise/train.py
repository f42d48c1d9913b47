"""One training step on any TP x DP layout of the resident provider: forward, backward, reductions, AdamW.

The loss of a step is the mean next-token cross-entropy over the *global* batch, computed
vocab-parallel from each TP rank's slice of the logits (``loss``): each DP
rank sums its own tokens' losses and divides by the global token count, so summing the
ranks' gradients over DP gives the gradient of that one mean whatever the split, even
an uneven one. Within TP, the collectives carry their backward and ``TpGradReducer``
sums the regions the plan finds partial; a tied embedding and LM head on one stage are
one tensor, so their gradients already add up in it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .grads import TpGradReducer
from .loss import vocab_parallel_cross_entropy
from .model import Model
from .optim import AdamW


class Trainer:
    """Trains ``model``'s masters in place; construction is collective (it creates the reduction groups)."""

    def __init__(self, model: Model, optimizer: AdamW):
        plan = model.plan
        if plan.provider != "resident":
            raise NotImplementedError(f"rank {plan.rank}: training runs on provider='resident' so far, not "
                                      f"{plan.provider!r}")
        if plan.layout.pp > 1:
            raise NotImplementedError(f"rank {plan.rank}: training over pipeline stages (pp={plan.layout.pp}) is "
                                      "not built yet: use pp=1")
        self.model, self.optimizer = model, optimizer
        self.tensors = model.provider.tensors
        self.params = list({id(t): t for t in self.tensors.values()}.values())
        for t in self.params:
            t.requires_grad_()
        self.reducer = TpGradReducer(plan)

    def step(self, ids: torch.Tensor, global_tokens: int) -> float:
        """Train on this DP rank's sequences ``ids`` (batch, seq); ``global_tokens`` counts the predicted tokens of
        the whole step's batch over every DP rank. Returns the global mean loss (the same on every rank)."""
        comm = self.model.comm
        logits = self.model.forward(ids, local_vocab=True)  # this rank's vocab slice: never gathered
        targets = ids[:, 1:].to(logits.device)
        total = vocab_parallel_cross_entropy(logits[:, :-1], targets, self.model.plan.vocab[0], comm.tp_group,
                                             reduction="sum").float()
        (total / global_tokens).backward()
        grads = {name: t.grad for name, t in self.tensors.items()}
        self.reducer.reduce(grads)
        loss = total.detach() / global_tokens
        if comm.layout.dp > 1:
            for t in self.params:
                dist.all_reduce(t.grad, group=comm.dp_group)
            dist.all_reduce(loss, group=comm.dp_group)
        self.optimizer.step(grads)
        for t in self.params:
            t.grad = None
        return float(loss)

    def close(self) -> None:
        self.reducer.close()
