"""The load-balancing auxiliary loss of a mixture of experts, as HF adds it when ``output_router_logits`` is set.

HF's loss (Switch Transformer's) over a forward's sparse layers and tokens: ``E x sum_e
f_e x P_e``, where ``f_e`` is the fraction of (layer, token, top-k slot) choices that went to
expert ``e`` and ``P_e`` the mean router probability of ``e``, each over layers x tokens,
times ``router_aux_loss_coef``. The counts have no gradient, so the loss is linear in every
layer's probabilities: once the forward has counted every layer's choices (over every DP
rank: the batch is the global one), each layer's share of the gradient is its probability
sums weighed by the counts, added to that layer's own backward (``term``). That holds
however the backward runs, block by block and even recomputed under ZeRO-3.

Under EP each rank routes its own rows of the batch, so the counts and probability sums
are summed over the EP group as well, and each rank adds the term of its own tokens (the
router's gradient is summed over the group, as ``grads.ep_partials`` says).
"""

from __future__ import annotations

import torch

from ..model.forward import Model
from ..model.moe import MoE


class Balance:
    """One training's balancing loss: ``count`` after each forward, then ``term`` per sparse layer's backward."""

    def __init__(self, model: Model, coef: float):
        plan = model.plan
        self.comm, self.coef, self.experts = model.comm, coef, plan.spec.experts
        self.layers = {n: layer.mlp for n, layer in model.layers.items() if isinstance(layer.mlp, MoE)}
        for moe in self.layers.values():
            moe.remember = True
        self.weights: torch.Tensor | None = None

    def count(self, micro_batches: int) -> torch.Tensor:
        """After a forward: the global counts weighing each layer's probabilities; returns this rank's share of the
        loss (the shares of the DP and EP ranks sum to it), as a mean over the step's ``micro_batches``."""
        routed = [moe.routed for moe in self.layers.values()]
        counts = sum(torch.histc(chosen.reshape(-1).float(), bins=self.experts, min=0, max=self.experts)
                     for _, chosen in routed)
        probs = sum(p.detach().sum(0) for p, _ in routed)
        rows = probs.new_tensor([float(sum(p.shape[0] for p, _ in routed))])
        totals = self.comm.token_sum(torch.cat([counts, probs, rows]))
        counts, probs, rows = totals[: self.experts], totals[self.experts: -1], totals[-1]
        scale = self.coef * self.experts / rows**2 / micro_batches
        self.weights = scale * counts
        return (self.weights * probs).sum() / (self.comm.layout.dp * self.comm.layout.ep)

    def term(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s part of the loss, whose gradient its backward adds (None: nothing to add here)."""
        moe = self.layers.get(layer)
        if moe is None:
            return None
        return (self.weights * moe.routed[0].sum(0)).sum()
