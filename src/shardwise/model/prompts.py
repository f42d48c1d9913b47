"""The prompt-learning tables a model looks up: every task's virtual tokens, one stack of rows past the vocabulary.

Task ``k``'s virtual tokens are the ids ``vocab + start_k`` onwards, so a batch may mix tasks
and the lookup is the embedding's own (``Model.embed``); under TP each rank holds its share
of the stack's rows as it holds its share of the vocabulary. ``io.prompt_table`` loads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan.boxes import split_evenly
from ..plan.rank import RankPlan


def rank_rows(plan: RankPlan, total: int) -> tuple[int, int]:
    """The rows of a stack of ``total`` virtual tokens this rank holds: its TP share where the plan splits the
    embedding (the lookup assembles them over TP as it does the vocabulary), all of them where it replicates it."""
    if plan.styles["embed"] == "replicated":
        return 0, total
    return split_evenly(total, plan.layout.tp)[plan.tp_rank]


@dataclass(frozen=True)
class PromptTables:
    """A model's tables: each task's first virtual id past the vocabulary and its length (``tasks``), and this
    rank's rows ``rows`` of their stack (``local``), in the model's dtype."""

    tasks: dict[str, tuple[int, int]]
    rows: tuple[int, int]
    local: torch.Tensor

    def ids(self, task: str, vocab: int) -> torch.Tensor:
        """The virtual token ids of ``task``: past the vocabulary, where the stack's rows are looked up."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r} (prompt tables: {', '.join(self.tasks) or 'none loaded'})")
        start, length = self.tasks[task]
        return torch.arange(vocab + start, vocab + start + length)
