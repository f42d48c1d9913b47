"""A sparse MLP block: the router picks each token's experts, the rank's experts compute, the outputs are summed.

The math follows HF's mixture-of-experts blocks step for step: router logits in the
activations' dtype, softmax in fp32, top-k, the optional renormalization, the weights cast
to the activations' dtype (Qwen) or kept in fp32 (Mixtral), each expert's SwiGLU on the
tokens routed to it (grouped by expert: one grouped matmul per projection), weighted and
summed over each token's slots, and Qwen2-MoE's shared expert behind its sigmoid gate. The
router runs whole on every rank; the experts are the rank's (``RankPlan.experts``), stacked
into one tensor per kind by the plan, and the EP ranks' sums are added up over the EP group
(autograd's all-reduce, whose backward hands each rank the whole gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dist.collectives import copy_to, reduce_from
from ..dist.comm import Comm
from ..plan.rank import RankPlan


class MoE:
    """One sparse layer's experts over this rank's share of them."""

    def __init__(self, plan: RankPlan, comm: Comm):
        spec, routing = plan.spec, plan.spec.table.routing
        self.group = comm.ep_group if plan.layout.ep > 1 else None
        self.top_k, self.norm_topk, self.fp32_weights = spec.top_k, spec.norm_topk, routing.weights_in_fp32
        self.experts = range(*plan.experts)
        self.shared = spec.shared_expert
        self.remember = False  # keep the last call's routing (training's balancing loss reads it)
        self.routed: tuple[torch.Tensor, torch.Tensor] | None = None  # (probabilities, chosen experts)

    def route(self, x: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts and their weights, (tokens, k) each."""
        probs = F.softmax(F.linear(x, router), dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.remember:
            self.routed = probs, chosen
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.fp32_weights else weights.to(x.dtype)), chosen

    def __call__(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routed = copy_to(x, self.group)  # each EP rank's experts send back their part of its gradient
        weights, chosen = self.route(routed, w["router"])
        out = self.experts_sum(routed, weights, chosen, w["experts_gate_up"], w["experts_down"])
        if self.group is not None:  # every EP rank's experts, summed; the shared expert is whole on each, added once
            out = reduce_from(out, self.group)
        if self.shared:
            gate, up = F.linear(x, w["shared_gate_up"]).chunk(2, dim=-1)
            shared = F.linear(F.silu(gate) * up, w["shared_down"])
            out = out + torch.sigmoid(F.linear(x, w["shared_gate"])) * shared
        return out.view(shape)

    def experts_sum(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
        """Each token's weighted sum of its chosen experts' outputs, over the experts this rank holds.

        As HF's grouped path: the (token, slot) choices of this rank's experts sorted by expert, both projections
        one grouped matmul each, weighted, put back in (token, slot) order and summed over the slots (the other
        ranks' slots are zero here).
        """
        tokens, k = chosen.shape
        local = len(self.experts)
        flat = chosen.reshape(-1) - self.experts.start
        mine = ((flat >= 0) & (flat < local)).nonzero().squeeze(-1)
        expert, order = torch.sort(flat[mine], stable=True)
        slots = mine[order]  # (token, slot) positions, grouped by expert
        ends = torch.bincount(expert, minlength=local).cumsum(0).to(torch.int32)
        h = grouped_linear(x[slots // k], gate_up.view(local, -1, x.shape[-1]), ends)
        gate, up = h.chunk(2, dim=-1)
        y = grouped_linear(F.silu(gate) * up, down.view(local, x.shape[-1], -1), ends)
        y = y * weights.reshape(-1)[slots, None]
        out = y.new_zeros(tokens * k, x.shape[-1]).index_copy(0, slots, y)
        return out.view(tokens, k, -1).sum(dim=1).to(x.dtype)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ``ends[i-1]:ends[i]`` of ``x`` through ``weight[i]`` (out x in), for every i at once: torch's grouped
    matmul where it runs (its kernels want 16-byte aligned rows), else one matmul per group."""
    if hasattr(torch, "_grouped_mm") and all(n * x.element_size() % 16 == 0 for n in weight.shape[1:]):
        return torch._grouped_mm(x.contiguous(), weight.transpose(-2, -1), offs=ends)
    starts = [0, *ends[:-1].tolist()]
    return torch.cat([x[a:b] @ w.T for a, b, w in zip(starts, ends.tolist(), weight)])
