"""The rank side of ``shardwise train``: load, step through the token stream, log, save.

Every rank runs the same loop; the data each DP rank trains on comes from
``data.TokenStream`` (so it follows from the seed and the step alone), and rank 0 alone
draws the progress bar and writes the JSON-lines log. Every save is a training
checkpoint (``train_state``), which a later run resumes from, under any layout.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch

from .data import TokenStream
from .layout import Layout
from .loader import Provide, load_model
from .model import Model
from .optim import AdamW
from .progress import progress_meter
from .train import Trainer
from .train_state import restore, save_training

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainArgs:
    checkpoint: str
    layout: Layout
    provide: Provide
    stream: TokenStream
    steps: int
    lr: float
    save: str
    warmup: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    clip: float | None = 1.0
    accumulate: int = 1
    save_every: int | None = None
    overwrite: bool = False
    log: str | None = None
    resume: str | None = None  # a training checkpoint of ``checkpoint`` to go on from


def learning_rate(step: int, lr: float, steps: int, warmup: int = 0, schedule: str = "constant") -> float:
    """The rate of step ``step`` (from 1): linear warmup over ``warmup`` steps, then constant, or a cosine down to
    lr/10 at ``steps``."""
    if step <= warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def settings(job: TrainArgs) -> dict:
    """What a training checkpoint records of the run beyond its data, for a resume to compare."""
    return {"steps": job.steps, "lr": job.lr, "warmup": job.warmup, "schedule": job.schedule,
            "weight_decay": job.weight_decay, "clip": job.clip, "accumulate": job.accumulate}


def _first_step(job: TrainArgs, model: Model, optimizer: AdamW) -> int:
    """1, or with ``job.resume`` the step after the saved one, the optimizer's state restored from it."""
    if not job.resume:
        return 1
    record = restore(job.resume, model, optimizer)
    record.check_resumable(job.resume, job.stream, job.steps)
    return record.step + 1


def train_rank(job: TrainArgs) -> dict:
    """Train up to step ``job.steps`` on this rank's part of the layout; rank 0's summary is the launch's result."""
    p = job.provide
    model = load_model(job.resume or job.checkpoint, job.layout, dtype=torch.float32, progress=False,
                       provider=p.provider, work_dtype=p.work_dtype, prefetch=p.prefetch, offload=p.offload)
    rank0 = model.plan.rank == 0
    optimizer = AdamW(model.provider, lr=job.lr, weight_decay=job.weight_decay)
    trainer = Trainer(model, optimizer, max_grad_norm=job.clip)
    first = _first_step(job, model, optimizer)
    stream, dp, dp_rank = job.stream, job.layout.dp, model.plan.dp_rank
    losses: list[float] = []
    saved = False
    out = open(job.log, "a" if job.resume else "w") if rank0 and job.log else None  # noqa: SIM115 - closed in the finally
    bar = progress_meter(rank0, total=job.steps - first + 1, desc="training", unit="step")
    try:
        for step in range(first, job.steps + 1):
            optimizer.lr = learning_rate(step, job.lr, job.steps, job.warmup, job.schedule)
            batches = stream.micro_batches(step, dp_rank, dp, job.accumulate)
            start = time.perf_counter()
            result = trainer.step(batches, stream.global_tokens)
            tokens_per_s = stream.global_tokens / (time.perf_counter() - start)
            losses.append(result.loss)
            if out is not None:
                out.write(json.dumps({"step": step, "loss": result.loss, "lr": optimizer.lr,
                                      "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s}) + "\n")
                out.flush()
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            bar.update()
            if job.save_every and step % job.save_every == 0 and step < job.steps:
                save_training(model, optimizer, job.save, stream, job.overwrite or saved, settings(job))
                saved = True
        save_training(model, optimizer, job.save, stream, job.overwrite or saved, settings(job))
    finally:  # on failure the launcher stops every rank: no collective teardown to wait on here
        bar.close()
        if out is not None:
            out.close()
    trainer.close()
    model.close()
    return {"first_step": first, "steps": job.steps, "first_loss": losses[0], "last_loss": losses[-1],
            "save": job.save}
