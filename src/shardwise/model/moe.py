"""A sparse MLP block: the router picks each token's experts, the rank's experts compute, the outputs are summed.

The math follows HF's mixture-of-experts blocks step for step: router logits in the
activations' dtype, softmax in fp32, top-k, the optional renormalization, the weights cast
to the activations' dtype (Qwen) or kept in fp32 (Mixtral), each expert's SwiGLU on the
tokens routed to it (grouped by expert: one grouped matmul per projection), weighted and
summed over each token's slots, and Qwen2-MoE's shared expert behind its sigmoid gate.

The experts are the rank's (``RankPlan.experts``), stacked into one tensor per kind by the
plan. Under EP each rank of a group computes its own rows of the batch (``RankPlan.batch_rows``);
it routes its tokens, sends every (token, slot) row to the rank holding its expert, the rows
per expert counted in the same exchange, and gets the output back (all-to-all both ways,
``collectives.exchange_runs`` and ``exchange``), and weighs and sums its
tokens' slots. The shared expert runs on the rank's tokens like any dense weight. Each
collective's backward is its dual, so training works through the dispatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dist.collectives import exchange, exchange_runs
from ..dist.comm import Comm
from ..plan.rank import RankPlan, expert_shares
from .layers import swiglu


class MoE:
    """One sparse layer's experts over this rank's share of them."""

    def __init__(self, plan: RankPlan, comm: Comm):
        spec, routing = plan.spec, plan.spec.table.routing
        self.group, self.ep = (comm.ep_group if plan.layout.ep > 1 else None), plan.layout.ep
        self.shm = comm.ep_shm
        # Each expert's place in its EP rank's stack (``slot[e]``), and in all the ranks' stacks one after another
        # (``position[e]``): rows sorted by position are in runs per expert, each rank's runs together.
        shares = expert_shares(spec, plan.layout)
        self.widths = [len(share) for share in shares]
        self.slot = torch.empty(spec.experts, dtype=torch.long)
        self.position = torch.empty(spec.experts, dtype=torch.long)
        for rank, share in enumerate(shares):
            self.slot[share.start:share.stop:share.step] = torch.arange(len(share))
            self.position[share.start:share.stop:share.step] = torch.arange(len(share)) + sum(self.widths[:rank])
        self.top_k, self.norm_topk, self.fp32_weights = spec.top_k, spec.norm_topk, routing.weights_in_fp32
        self.local_experts = len(plan.experts)
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

    def __call__(self, x: torch.Tensor, w: dict[str, torch.Tensor], seq: list[int] | None = None) -> torch.Tensor:
        assert seq is None, "sequence parallelism is refused for mixtures of experts when the model loads"
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x, w["router"])
        y = self.dispatch(x, chosen.reshape(-1), w["experts_gate_up"], w["experts_down"])
        out = (y.view(*chosen.shape, x.shape[-1]) * weights[..., None]).sum(dim=1).to(x.dtype)
        if self.shared:
            shared = F.linear(swiglu(F.linear(x, w["shared_gate_up"])), w["shared_down"])
            out = out + torch.sigmoid(F.linear(x, w["shared_gate"])) * shared
        return out.view(shape)

    def dispatch(self, x: torch.Tensor, chosen: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
                 ) -> torch.Tensor:
        """The chosen expert's output for every (token, slot) of ``x`` (in that order), unweighted: each row goes to
        the EP rank holding its expert, with the count of rows per expert, and its output comes back (all-to-all
        both ways)."""
        rows = x.repeat_interleave(self.top_k, dim=0)
        if self.group is None:
            return self.compute(rows, self.slot.to(chosen.device)[chosen], gate_up, down)
        position = self.position.to(chosen.device)[chosen]
        order = torch.argsort(position, stable=True)
        counts = torch.bincount(position, minlength=len(self.position)).tolist()
        got, runs, send = exchange_runs(rows[order], counts, self.widths, self.group, self.shm)
        slots = torch.arange(self.local_experts).repeat(self.ep).repeat_interleave(torch.tensor(runs).view(-1))
        back = exchange(self.compute(got, slots.to(got.device), gate_up, down), [sum(r) for r in runs], send,
                        self.group, self.shm)
        return back.new_zeros(back.shape).index_copy(0, order, back)

    def compute(self, rows: torch.Tensor, slots: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
                ) -> torch.Tensor:
        """Each row through this rank's ``slots[i]``-th expert, in the rows' order: grouped by expert, one grouped
        matmul per projection, as HF's grouped path."""
        local, hidden = self.local_experts, rows.shape[-1]
        expert, order = torch.sort(slots, stable=True)
        ends = torch.bincount(expert, minlength=local).cumsum(0).to(torch.int32)
        h = grouped_linear(rows[order], gate_up.view(local, -1, hidden), ends)
        y = grouped_linear(swiglu(h), down.view(local, hidden, -1), ends)
        return y.new_zeros(y.shape).index_copy(0, order, y)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ``ends[i-1]:ends[i]`` of ``x`` through ``weight[i]`` (out x in), for every i at once: torch's grouped
    matmul where it runs (its kernels want 16-byte aligned rows), else one matmul per group."""
    if _grouped_mm_runs(x) and all(n * x.element_size() % 16 == 0 for n in weight.shape[1:]):
        return torch._grouped_mm(x.contiguous(), weight.transpose(-2, -1), offs=ends)
    starts = [0, *ends[:-1].tolist()]
    return torch.cat([x[a:b] @ w.T for a, b, w in zip(starts, ends.tolist(), weight)])


def _grouped_mm_runs(x: torch.Tensor) -> bool:
    """Whether torch's grouped matmul has a kernel for ``x``: on CPU from torch 2.9, on CUDA from compute
    capability 8.0."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu" and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)
