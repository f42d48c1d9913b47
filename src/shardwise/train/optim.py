"""AdamW on a provider's master tensors, block by block through the provider's update hooks.

The update is torch.optim.AdamW's (decoupled weight decay, bias correction), so a
shardwise run and a one-process torch run step the same weights the same way. It
never touches parameters directly: each block's masters come from
``fetch_master`` / ``master`` and go back with ``release_master``, the next block
fetched while one is updated, so masters that live off the device (offload) stream
through two buffers, and ``end_update`` invalidates every work weight derived from them.
With offload the moments live where the masters do (``provider.state_device``), and so
do the gradients handed in: each block's moments and gradient visit the device with its
master, in one set of buffers, and the moments go back.

The moments are laid out as the plan lays out the weights (``weights.allocate``): a
master a provider names by tensor (resident) or by flat block (ZeRO-3) finds its state
under the same name, and every held tensor has a view of its moments, with the very
boxes of its weight. That is what lets a sharded checkpoint save the moments as boxes
of HF tensors and load them under any other layout.
"""

from __future__ import annotations

import torch

from ..providers.base import Provider
from ..providers.weights import allocate

MOMENTS = ("exp_avg", "exp_avg_sq")


class AdamW:
    """Decoupled-weight-decay Adam over ``provider``'s masters; its fp32 moments are laid out like the weights."""

    def __init__(self, provider: Provider, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        check_settings(lr, betas, eps, weight_decay)
        self.provider, self.lr, self.betas, self.eps, self.weight_decay = provider, lr, betas, eps, weight_decay
        self.steps = 0  # updates so far, which the bias correction counts
        plan = provider.plan
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}  # moment -> plan buffer -> flat state
        self.moments: dict[str, dict[str, torch.Tensor]] = {}  # moment -> held tensor -> view of it
        for moment in MOMENTS:
            self.buffers[moment], self.moments[moment] = allocate(plan, [torch.float32] * len(plan.buffers),
                                                                  provider.state_device, provider.state_pinned)
        largest = max((b.numel for b in plan.buffers), default=0)
        self.staging = torch.zeros(len(MOMENTS) + 1, largest, dtype=torch.float32, device=provider.device) \
            if provider.offload else None  # a block's exp_avg, exp_avg_sq and gradient on the device

    def nbytes(self) -> dict[str, int]:
        """Bytes of the moments, and of the device's copy of one block's state (offload)."""
        moments = sum(t.nbytes for buffers in self.buffers.values() for t in buffers.values())
        return {"moments": moments, "staging": 0 if self.staging is None else self.staging.nbytes}

    def _state(self, moment: str, name: str) -> torch.Tensor:
        """The state of the master called ``name``: a held tensor's view, or a ZeRO-3 block's flat buffer.

        The names cannot mix up: a ZeRO-3 plan holds its tensors as ``name@start`` chunks, so a
        block's name is never a held tensor's, and a resident plan's buffers are its tensors."""
        views = self.moments[moment]
        return views[name] if name in views else self.buffers[moment][name]

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        """One update of every master from ``grads``: by the names ``provider.master`` gives (held tensors for
        resident, flat blocks for ZeRO-3), each a fully reduced fp32 gradient of the master's shape.

        A step that cannot finish is refused before anything changes: ``steps``, which the bias
        correction counts, every master and every moment stay as they were.
        """
        self._check(grads)
        step = self.steps + 1
        provider, blocks = self.provider, list(self.provider.plan.blocks)
        provider.begin_update()
        if blocks:
            provider.fetch_master(blocks[0])
        for i, block in enumerate(blocks):
            if i + 1 < len(blocks):
                provider.fetch_master(blocks[i + 1])  # in flight while this block updates
            for name, master in provider.master(block).items():
                self._update(name, master, grads[name], step)
            provider.release_master(block)
        provider.end_update()
        self.steps = step

    def _check(self, grads: dict[str, torch.Tensor]) -> None:
        """Every reason an update would stop part-way (a master or a gradient it cannot take), found before it starts;
        the provider's own refusals come at ``begin_update``, before any master is fetched."""
        provider = self.provider
        for block in provider.plan.blocks:
            for name, master in provider.masters_at_rest(block).items():
                where = f"rank {provider.plan.rank}: AdamW: block {block!r}: master {name!r}"
                if master.dtype != torch.float32:
                    raise TypeError(f"{where} is {master.dtype}, expected float32 masters (load with "
                                    "dtype=torch.float32; the work dtype may differ)")
                grad = grads.get(name)
                if grad is None:
                    raise ValueError(f"{where} has no gradient")
                if grad.shape != master.shape or grad.dtype != torch.float32:
                    raise ValueError(f"{where}: its gradient is {tuple(grad.shape)} {grad.dtype}, expected "
                                     f"{tuple(master.shape)} torch.float32")

    def _update(self, name: str, param: torch.Tensor, grad: torch.Tensor, step: int) -> None:
        m, v = self._state("exp_avg", name), self._state("exp_avg_sq", name)
        if self.staging is None:
            self._adamw(param, m, v, grad, step)
            return
        staged = [row[: param.numel()].view(param.shape) for row in self.staging]
        for row, held in zip(staged, (m, v, grad)):
            row.copy_(held, non_blocking=True)
        self._adamw(param, *staged, step)
        m.copy_(staged[0], non_blocking=True)  # end_update waits for these
        v.copy_(staged[1], non_blocking=True)

    def _adamw(self, param: torch.Tensor, m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, step: int) -> None:
        adamw_(param, m, v, grad, step, self.lr, self.betas, self.eps, self.weight_decay)


def check_settings(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not lr > 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps > 0 or weight_decay < 0:
        raise ValueError(f"AdamW: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}: expected "
                         "lr > 0, betas in [0, 1), eps > 0, weight_decay >= 0")


def adamw_(param: torch.Tensor, m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, step: int, lr: float,
           betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW's update of ``param`` and its moments, in place: step ``step`` (from 1) of the bias
    correction. Every optimizer of shardwise's (the masters', a prompt table's) updates through this one."""
    beta1, beta2 = betas
    with torch.no_grad():
        param.mul_(1 - lr * weight_decay)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        param.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
