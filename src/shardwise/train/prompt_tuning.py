"""Prompt tuning: a new prompt table trained in front of a frozen model.

The table is the model's prompt-table stack (``model.prompts``) holding one task, as a
leaf tensor: each TP rank holds and trains its share of the rows where the plan splits
the embedding (a lookup assembles them over TP, as at inference), every rank all of them
where the plan replicates it. The step's walk (``step``) runs forward and backward as for
full training, but the weights make no gradient: a resident model's tensors and a ZeRO-3
model's gathered ones are used as they are, no master is updated and no moment kept for
them. A rank's table gradient covers its own tokens; summed over the ranks that compute
other tokens of the step (DP replicas, EP ranks) it is the whole batch's, the same on all.

The table starts as PEFT's does: the embedding rows of a text's tokens, repeated to the
table's length (PEFT's ``TEXT`` init), or of ids drawn from the seed (``SAMPLE_VOCAB``),
so every world size starts from the same table. A save is a PEFT prompt-tuning adapter,
which PEFT and ``--prompt-table`` load, with AdamW's moments and the run's record beside
it, from which a run resumes under any layout, each rank reading only its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from ..dist.collectives import gather_rows
from ..io.collective_write import write_checkpoint
from ..io.prompt_table import KEY, RECORD, STATE, read_json, read_rows, table_shape, write_table
from ..io.reader import CheckpointError
from ..model.forward import Model
from ..model.prompts import PromptTables, rank_rows
from ..plan.boxes import split_evenly
from ..plan.names import EMBED, Block
from .data import TokenStream
from .optim import MOMENTS, adamw_, check_settings
from .state import Record, stream_identity


def init_ids(virtual: int, vocab: int, text_ids: Sequence[int] | None = None, seed: int = 0) -> list[int]:
    """The ids whose embedding rows a new table starts from: ``text_ids`` cut or repeated to ``virtual`` (PEFT's
    TEXT init), else ``virtual`` ids drawn from ``seed`` (SAMPLE_VOCAB), the same on every rank."""
    if text_ids is not None:
        if not text_ids:
            raise ValueError("the init text has no tokens")
        return (list(text_ids) * -(-virtual // len(text_ids)))[:virtual]
    return torch.randint(0, vocab, (virtual,), generator=torch.Generator().manual_seed(seed)).tolist()


def read_record(directory: str | Path) -> Record:
    """The record of a table that ``shardwise train --train prompt-table`` saved; a CheckpointError if it has none
    or it is malformed."""
    directory = Path(directory)
    if not (directory / RECORD).is_file():
        raise CheckpointError(f"{directory}: no {RECORD}: not a prompt table that shardwise train saved, so there "
                              "is no optimizer state to resume from")
    return Record.parse(read_json(directory, RECORD, "training record"), directory / RECORD)


def read_state(directory: Path, rows: tuple[int, int], virtual: int, hidden: int) -> dict[str, torch.Tensor]:
    """AdamW's moments of rows ``rows`` of a saved table (one zero row where there are none), refused unless each
    is stored as fp32 [virtual, hidden], finite, with a second moment nowhere negative (else its square root would
    turn the table into NaN at the first update)."""
    lo, hi = rows
    out = {}
    for m in MOMENTS:
        out[m] = torch.zeros(max(hi - lo, 1), hidden, dtype=torch.float32)
        read_rows(directory, m, rows, out[m], STATE, total=virtual)
        if not bool(out[m].isfinite().all()) or (m == "exp_avg_sq" and bool((out[m] < 0).any())):
            raise CheckpointError(f"{directory / STATE}: tensor {m!r} rows {lo}..{hi} hold "
                                  f"{'negative' if bool(out[m].isfinite().all()) else 'non-finite'} values, expected "
                                  "AdamW moments (finite, the second one >= 0)")
    return out


class PromptTuning:
    """A prompt table as what a step trains, with AdamW's state; the model's weights stay as loaded."""

    weight_grads = False

    def __init__(self, model: Model, task: str, virtual: int, rows: torch.Tensor, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 moments: dict[str, torch.Tensor] | None = None, steps: int = 0):
        """``rows``: this rank's rows of the table (``rank_rows``); ``moments`` and ``steps`` those of a resume."""
        check_settings(lr, betas, eps, weight_decay)
        if model.plan.layout.pp > 1:
            raise NotImplementedError(f"rank {model.plan.rank}: prompt tuning runs on one pipeline stage, not "
                                      f"pp={model.plan.layout.pp}")
        self.model, self.task, self.virtual = model, task, virtual
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.rows = rank_rows(model.plan, virtual)
        # whether the TP ranks hold different rows: decided by the plan alone, so all of them agree
        self.split = model.plan.styles["embed"] != "replicated" and model.plan.layout.tp > 1
        lo, hi = self.rows
        # A rank whose share is empty holds one zero row that no lookup selects (as at inference).
        table = torch.zeros(max(hi - lo, 1), model.spec.hidden, dtype=torch.float32, device=model.device)
        table[: hi - lo] = rows
        self.table = table.requires_grad_()
        model.prompts = PromptTables({task: (0, virtual)}, self.rows, self.table)
        self.prefix = model.prompts.ids(task, model.spec.vocab)
        self.moments = moments or {m: torch.zeros_like(table) for m in MOMENTS}
        self.steps = steps

    @classmethod
    def start(cls, model: Model, task: str, ids: Sequence[int], **settings) -> PromptTuning:
        """A new table of ``len(ids)`` rows: the embedding's rows of ``ids`` (``init_ids``). Collective: the
        lookup assembles the rows over TP, and a ZeRO-3 model gathers its embedding for it."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=model.device)
        with model.provider.stream([EMBED]) as weights, torch.no_grad():
            rows = model.embed(ids[None], next(weights))[0].float()
        lo, hi = rank_rows(model.plan, len(ids))
        return cls(model, task, len(ids), rows[lo:hi], **settings)

    @classmethod
    def resume(cls, model: Model, directory: str | Path, task: str, **settings) -> tuple[PromptTuning, Record]:
        """The table, moments and step a save in ``directory`` holds, this rank reading only its rows."""
        directory = Path(directory)
        record = read_record(directory)
        virtual = table_shape(directory, model.spec)
        lo, hi = rank_rows(model.plan, virtual)
        rows = torch.zeros(hi - lo, model.spec.hidden, dtype=torch.float32)
        read_rows(directory, KEY, (lo, hi), rows)
        moments = read_state(directory, (lo, hi), virtual, model.spec.hidden)
        moments = {m: t.to(model.device) for m, t in moments.items()}
        return cls(model, task, virtual, rows.to(model.device), moments=moments, steps=record.step,
                   **settings), record

    def reduce(self, block: Block, w: dict[str, torch.Tensor], last: bool) -> None:
        """Nothing per block: the table's gradient is summed once, when the step's micro-batches are done."""

    def squared_norm(self) -> float:
        """The table's gradient summed over the ranks computing other tokens, then its squared norm, each row
        counted once (over the TP group where the rows are split)."""
        if self.table.grad is None:  # this rank had no rows of the batch
            self.table.grad = torch.zeros_like(self.table)
        grad = self.model.comm.token_sum(self.table.grad)
        lo, hi = self.rows
        squares = grad[: hi - lo].double().pow(2).sum().reshape(1)
        if self.split:
            dist.all_reduce(squares, group=self.model.comm.tp_group)
        return float(squares)

    def scale(self, factor: float) -> None:
        self.table.grad.mul_(factor)

    def update(self) -> None:
        self.steps += 1
        adamw_(self.table, *(self.moments[m] for m in MOMENTS), self.table.grad, self.steps, self.lr, self.betas,
               self.eps, self.weight_decay)
        self.table.grad = None

    def nbytes(self) -> dict[str, int]:
        """The table, its gradient and moments: all a prompt tuning adds to the frozen model's weights."""
        table = self.table.nbytes
        return {"table": table, "gradients": table, "moments": len(MOMENTS) * table}

    def close(self) -> None:
        pass

    def whole(self) -> dict[str, torch.Tensor]:
        """Collective over the TP group: the whole table and moments, assembled from every rank's rows."""
        lo, hi = self.rows
        mine = {KEY: self.table.detach()[: hi - lo]} | {m: t[: hi - lo] for m, t in self.moments.items()}
        if not self.split:
            return {k: t.cpu() for k, t in mine.items()}
        sizes = [b - a for a, b in split_evenly(self.virtual, self.model.plan.layout.tp)]
        with torch.no_grad():
            return {k: gather_rows(t.contiguous(), sizes, self.model.comm.tp_group).cpu() for k, t in mine.items()}

    def save(self, out: str | Path, stream: TokenStream, settings: dict, config: dict, overwrite: bool = False,
             sources: Sequence[str | Path] = ()) -> Path:
        """Collective: the table as a PEFT prompt-tuning adapter in ``out`` (``config``: more of PEFT's adapter
        config), with the moments and the record a resume reads; rank 0 writes, every rank agrees on the outcome."""
        whole = self.whole()
        record = {"step": self.steps, "data": stream_identity(stream), "settings": settings}
        state = {m: whole[m] for m in MOMENTS}

        def finish(directory: Path, _written: dict) -> None:
            write_table(directory, whole[KEY], config, state, record)

        return write_checkpoint(out, [], finish, rank=self.model.plan.rank, overwrite=overwrite,
                                sources=list(sources), kind="table")
