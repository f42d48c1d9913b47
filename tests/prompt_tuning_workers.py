"""Rank-side half of tests/test_prompt_tuning.py: prompt tuning through ``train_rank``, and the frozen model."""

from __future__ import annotations

import torch
from conftest import VOCAB

from shardwise import Layout, load_model
from shardwise.io.loader import Provide
from shardwise.train.data import TokenStream
from shardwise.train.prompt_tuning import PromptTuning, init_ids
from shardwise.train.run import PromptArgs, TrainArgs, train_rank
from shardwise.train.step import Trainer

SEQ, BATCH, SEED, TASK = 8, 4, 5, "sums"
HYPER = dict(lr=2e-3, weight_decay=0.05, clip=0.05)  # clipping acts on every step (checked in the test)
# a 12-token phrase over and over, so the table can learn it and the loss falls
IDS = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(11)).tolist() * 17


def stream(batch: int = BATCH) -> TokenStream:
    return TokenStream.from_ids(IDS, SEQ, batch, SEED)


def tune(path: str, layout: Layout, provider: str, virtual: int, steps: int, save: str,
         resume: str | None = None, batch: int = BATCH) -> dict:
    """``shardwise train --train prompt-table`` as the CLI runs it on every rank: a new table of ``virtual`` rows
    (ids drawn from the seed), or the one ``resume`` holds, trained up to ``steps``."""
    prompt = PromptArgs(TASK, () if resume else tuple(init_ids(virtual, VOCAB, seed=SEED)), {})
    job = TrainArgs(path, layout, Provide(provider=provider), stream(batch), steps, HYPER["lr"], save,
                    weight_decay=HYPER["weight_decay"], clip=HYPER["clip"], overwrite=True, resume=resume,
                    prompt=prompt)
    return train_rank(job)


def frozen(path: str, layout: Layout, provider: str, virtual: int) -> dict:
    """Two steps of prompt tuning: whether any weight changed (bit for bit), and what the training holds."""
    with load_model(path, layout, dtype=torch.float32, provider=provider, progress=False) as model:
        def masters() -> dict[str, torch.Tensor]:
            return {n: t.clone() for b in model.plan.blocks for n, t in model.provider.masters_at_rest(b).items()}

        before = masters()
        tuning = PromptTuning.start(model, TASK, init_ids(virtual, VOCAB, seed=SEED), lr=HYPER["lr"])
        trainer = Trainer(model, tuning)
        start = tuning.table.detach().clone()
        for step in (1, 2):
            trainer.step(stream().micro_batches(step, model.plan.dp_rank, layout.dp), stream().predicted(virtual))
        changed = [name for name, t in masters().items() if not torch.equal(t, before[name])]
        grads = [n for b in model.plan.blocks for n, t in model.provider.masters_at_rest(b).items()
                 if t.requires_grad or t.grad is not None]
        out = {"changed": changed, "grads": grads,
               "nbytes": trainer.nbytes(), "moved": not torch.equal(start, tuning.table.detach()),
               "rows": tuning.rows, "hidden": model.spec.hidden}
        trainer.close()
    return out
