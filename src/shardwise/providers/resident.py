"""The resident provider: every work tensor stays in the rank's own buffers, handed out as it is."""

from __future__ import annotations

import torch

from ..plan.rank import RankPlan
from .base import Provider


class Resident(Provider):
    """Every work tensor stays on the rank: gather and release do nothing, and the masters are the work weights."""

    def __init__(self, plan: RankPlan, tensors: dict[str, torch.Tensor]):
        plain = next(t for t in tensors.values() if isinstance(t, torch.Tensor))  # not an int8 weight-only pair
        super().__init__(plan, plain.dtype)
        self.tensors, self.device = tensors, plain.device

    def _wait(self, block: str) -> dict[str, torch.Tensor]:
        return self.tensors

    def _at_rest(self, block: str) -> dict[str, torch.Tensor]:
        """The block's own tensors: an alias (a tied LM head) is updated once, with the block that owns it, and a
        series layer by the rank that stores it."""
        return {n: self.tensors[n] for n in self.plan.blocks[block] if n not in self.plan.alias and n in self.tensors}

    def nbytes(self) -> dict[str, int]:
        unique = {id(t): t for t in self.tensors.values()}
        return {"masters": sum(t.nbytes for t in unique.values()), "work": 0, "staging": 0}
