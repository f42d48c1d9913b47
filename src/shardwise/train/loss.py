"""Cross-entropy over a vocabulary split between TP ranks, without gathering the logits.

With the LM head split by vocabulary, each TP rank holds logits for its own slice of
the vocab only. Gathering them would move batch × seq × vocab values per step; the
loss needs only three numbers per token from each rank: its max logit, its sum of
exponentials, and the target's logit if the target falls in its slice. So the
forward is two all-reduces of one value per token (max, then sum of the shifted
exponentials together with the target logit), and the backward, softmax minus the
one-hot target, is computed from what each rank already has, with no collective.
Slices may be of any size: ``vocab_start`` says where this rank's begins.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE_INDEX = -100  # as in torch.nn.functional.cross_entropy and HF's labels


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 group: dist.ProcessGroup | None, ignore_index: int = IGNORE_INDEX,
                                 reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy`` of the full logits, computed from this rank's ``logits[..., v]`` for vocab ids
    ``vocab_start + v``.

    ``logits`` is (..., local vocab) and ``targets`` (...) holds global vocab ids, or
    ``ignore_index`` for tokens that do not count. ``reduction`` is ``"mean"`` (over the
    counted tokens), ``"sum"`` or ``"none"``. Every rank of ``group`` returns the same
    loss. The softmax is taken, and the loss returned and summed, in fp32 or wider whatever the logits' dtype,
    as HF upcasts the logits before its loss: rounding each token's loss to bf16 first would
    err by up to a half unit of bf16 per token (0.016 at a loss of 4).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction {reduction!r}: expected 'mean', 'sum' or 'none'")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} for logits of shape {tuple(logits.shape)}: "
                         f"expected {tuple(logits.shape[:-1])}")
    losses = _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, group, ignore_index)
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / (targets != ignore_index).sum()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                group: dist.ProcessGroup | None, ignore_index: int) -> torch.Tensor:
        wide = logits.float() if logits.dtype.itemsize < 4 else logits
        width = wide.shape[-1]
        peak = wide.max(dim=-1).values
        if group is not None:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        exp = (wide - peak.unsqueeze(-1)).exp_()  # the only tensor of the logits' size kept for the backward
        local = targets - vocab_start
        mine = (local >= 0) & (local < width) & (targets != ignore_index)
        index = torch.where(mine, local, 0).unsqueeze(-1)
        picked = torch.where(mine, wide.gather(-1, index).squeeze(-1) - peak, 0)
        sums = torch.stack([exp.sum(dim=-1), picked])  # one all-reduce for both
        if group is not None:
            dist.all_reduce(sums, group=group)
        total, target_logit = sums
        counted = targets != ignore_index
        losses = torch.where(counted, torch.log(total) - target_logit, 0)
        ctx.save_for_backward(exp, total, index, mine, counted)
        ctx.dtype = logits.dtype
        return losses

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        exp, total, index, mine, counted = ctx.saved_tensors
        # The saved exponentials become the gradient in place: at a long sequence the logits' size is the largest
        # activation there is. (A second backward through the graph finds them changed and raises.)
        softmax = exp.div_(total.unsqueeze(-1))
        softmax.scatter_add_(-1, index, -mine.to(softmax.dtype).unsqueeze(-1))
        softmax.mul_(torch.where(counted, grad.to(softmax.dtype), 0).unsqueeze(-1))
        return softmax.to(ctx.dtype), None, None, None, None
