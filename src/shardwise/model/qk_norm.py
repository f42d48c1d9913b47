"""OLMo-2's q/k norms on a rank that holds only some heads: one all-reduce of per-token sums of squares.

HF normalizes q over its whole projection (heads x head_dim) and k over its own (KV heads x
head_dim), before the head split and rope, so its TP plan gathers q, k and v on every rank.
Here each rank keeps its heads: the mean square over the full width is the sum over the TP
ranks of each one's sum of squares, divided by the width, so one all-reduce of a
(batch, seq, 2) tensor per layer gives both statistics. The rest is local: each rank scales
its slice by its slice of the gains, which the plan splits with the heads.

Two things keep the sum exact. A KV head replicated on several TP ranks (tp > KV heads)
must count once, so only the first rank holding it adds its k sum (``counts_kv``). And under
autograd every rank applies the total to its own slice, so the total's gradient is the sum
of theirs: the all-reduce's backward all-reduces too (``shared_sum``), unlike the backward of
a row-parallel output's sum, which every rank uses alike.
"""

from __future__ import annotations

import torch

from ..dist.collectives import shared_sum
from ..dist.comm import Comm
from .layers import needs_grad, scale_norm


def full_width_qk_norm(comm: Comm, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       eps: float, widths: tuple[int, int], counts_kv: bool, fp32_scale: bool, split: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of this rank's q and k slices (batch, seq, local width) over the full widths ``widths`` (heads x
    head_dim, KV heads x head_dim), as HF computes it unsplit: statistics in fp32, gains as ``scale_norm``.
    Unless ``split`` (the TP plan splits attention by heads), the slices are whole and need no sum."""
    q32, k32 = q.float(), k.float()
    q_sum = q32.pow(2).sum(-1)
    k_sum = k32.pow(2).sum(-1) if counts_kv else torch.zeros_like(q_sum)
    sums = torch.stack([q_sum, k_sum], dim=-1)
    if split and comm.layout.tp > 1:
        sums = shared_sum(sums, comm.tp) if needs_grad(sums) else comm.tp_all_reduce(sums)
    q_inv = torch.rsqrt(sums[..., :1] / widths[0] + eps)
    k_inv = torch.rsqrt(sums[..., 1:] / widths[1] + eps)
    return (scale_norm(q32 * q_inv, q_weight, q.dtype, fp32_scale),
            scale_norm(k32 * k_inv, k_weight, k.dtype, fp32_scale))
