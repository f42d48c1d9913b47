"""The rank side of ``shardwise train``: load, step through the token stream, log, save.

Every rank runs the same loop; the data each DP rank trains on comes from
``data.TokenStream`` (so it follows from the seed and the step alone), and rank 0 alone
reports progress and writes the JSON-lines log. Every save is a training checkpoint
(``train.state``), which a later run resumes from, under any layout.

A run may save into the very checkpoint it resumed from (``--resume RUN --save RUN``, a
pre-emptible job's pattern): each save replaces RUN atomically with a later step. Every
rank has read all it needs of RUN (weights, moments, record) before its first step, and
a save renames only after every rank has agreed at each of the write's steps, so no rank
can still be reading RUN when it is replaced.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.loader import Provide, load_model
from ..model.forward import Model
from ..plan.mesh import Layout
from ..progress import StepProgress
from .data import TokenStream
from .optim import AdamW
from .prompt_tuning import PromptTuning
from .state import base_dtype, restore, save_training
from .step import Trainer

SCHEDULES = ("constant", "cosine")
LOG_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s")  # of every line after the log's first
LOG_KIND = "shardwise train log"


@dataclass(frozen=True)
class PromptArgs:
    """What ``--train prompt-table`` trains: a table for ``task``, a new one starting from the embedding rows of the
    ids ``init`` (``prompt_tuning.init_ids``; empty on a resume, which goes on from the saved table); ``config``
    says so in PEFT's adapter config."""

    task: str
    init: tuple[int, ...]
    config: dict


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
    resume: str | None = None  # a training checkpoint of ``checkpoint`` (or a table it trained) to go on from
    prompt: PromptArgs | None = None  # train a prompt table, the model frozen; None: train the model's weights


def same_directory(a: str | Path | None, b: str | Path) -> bool:
    return a is not None and Path(a).resolve() == Path(b).resolve()


def log_header(checkpoint: str | Path, prompt_table: bool = False) -> dict:
    """The first line of a training log: what wrote it, for which model (the base checkpoint, resolved), and
    whether it trained a prompt table rather than the weights."""
    header = {"log": LOG_KIND, "model": str(Path(checkpoint).resolve())}
    return header | {"trains": "prompt-table"} if prompt_table else header


def check_log(path: str | Path, checkpoint: str | Path, prompt_table: bool = False) -> None:
    """Refuse a ``--log`` that the run would truncate or append to but shardwise did not write for this model.

    A fresh run replaces the file and a resume appends to it, so either may only touch a
    training log of ``checkpoint`` (its first line is ``log_header``), an empty file, or
    a file yet to be created; anything else is the user's, and refused before any rank starts.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--log {path}: is a directory; give a file for the JSON lines")
    if not path.resolve().parent.is_dir():
        raise ValueError(f"--log {path}: its directory does not exist")
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        first = f.readline(1 << 16)  # a header is one short line; a large file without newlines is not one
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("log") != LOG_KIND:
        raise ValueError(f"--log {path}: exists and is not a shardwise training log; shardwise never overwrites or "
                         "appends to a file it did not write: give another file")
    if header != log_header(checkpoint, prompt_table):
        raise ValueError(f"--log {path}: is the training log of another model ({header.get('model')}) or of "
                         f"training {header.get('trains', 'weights')}; give another file")


def _open_log(job: TrainArgs):
    """The log, replaced by a fresh run, appended to by a resume; a new or empty file starts with its header."""
    out = open(job.log, "a" if job.resume else "w")  # noqa: SIM115 - train_rank closes it
    if not out.seekable() or out.tell() == 0:  # a pipe (--log /dev/stdout) gets the header too
        out.write(json.dumps(log_header(job.checkpoint, job.prompt is not None)) + "\n")
    return out


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
    out = {"steps": job.steps, "lr": job.lr, "warmup": job.warmup, "schedule": job.schedule,
           "weight_decay": job.weight_decay, "clip": job.clip, "accumulate": job.accumulate}
    return out if job.prompt is None else out | {"task": job.prompt.task}


def _weights(job: TrainArgs, model: Model):
    """Training the model's weights: AdamW over its masters (restored from ``job.resume``), the first step, and the
    save."""
    optimizer = AdamW(model.provider, lr=job.lr, weight_decay=job.weight_decay)
    first = 1
    if job.resume:
        record = restore(job.resume, model, optimizer)
        record.check_resumable(job.resume, job.stream, job.steps)
        first = record.step + 1
    dtype = base_dtype(job.resume or job.checkpoint)  # recorded with every save, for export
    sources = [job.checkpoint] + ([job.resume] if job.resume and not same_directory(job.resume, job.save) else [])

    def save(overwrite: bool) -> None:
        save_training(model, optimizer, job.save, job.stream, overwrite, settings(job), dtype, sources)

    return optimizer, first, save


def _prompt_table(job: TrainArgs, model: Model):
    """Training a prompt table before the frozen model: a new one, or the one ``job.resume`` saved; the first step,
    and the save."""
    p = job.prompt
    if job.resume:
        tuning, record = PromptTuning.resume(model, job.resume, p.task, lr=job.lr, weight_decay=job.weight_decay)
        record.check_resumable(job.resume, job.stream, job.steps)
    else:
        tuning = PromptTuning.start(model, p.task, p.init, lr=job.lr, weight_decay=job.weight_decay)
    sources = [job.checkpoint] + ([job.resume] if job.resume and not same_directory(job.resume, job.save) else [])

    def save(overwrite: bool) -> None:
        tuning.save(job.save, job.stream, settings(job), p.config, overwrite, sources)

    return tuning, tuning.steps + 1, save


def train_rank(job: TrainArgs) -> dict:
    """Train up to step ``job.steps`` on this rank's part of the layout; rank 0's summary is the launch's result."""
    p = job.provide
    source = job.checkpoint if job.prompt or not job.resume else job.resume
    model = load_model(source, job.layout, dtype=torch.float32, provider=p.provider, work_dtype=p.work_dtype,
                       prefetch=p.prefetch, offload=p.offload)
    rank0 = model.plan.rank == 0
    trains, first, save = (_prompt_table if job.prompt else _weights)(job, model)
    trainer = Trainer(model, trains, max_grad_norm=job.clip)
    target = trainer.target
    stream, dp, dp_rank = job.stream, job.layout.dp, model.plan.dp_rank
    virtual = 0 if target.prefix is None else len(target.prefix)
    predicted = stream.predicted(virtual)
    in_place = same_directory(job.resume, job.save)  # each save replaces the checkpoint this run resumed from
    losses: list[float] = []
    saved = False
    out = _open_log(job) if rank0 and job.log else None
    progress = StepProgress(rank0, first, job.steps)
    try:
        for step in range(first, job.steps + 1):
            target.lr = learning_rate(step, job.lr, job.steps, job.warmup, job.schedule)
            batches = stream.micro_batches(step, dp_rank, dp, job.accumulate)
            start = time.perf_counter()
            result = trainer.step(batches, predicted)
            tokens_per_s = predicted / (time.perf_counter() - start)
            losses.append(result.loss)
            if out is not None:
                out.write(json.dumps(dict(zip(LOG_KEYS, (step, result.loss, target.lr, result.grad_norm,
                                                         tokens_per_s)))) + "\n")
                out.flush()
            progress.update(step, {"loss": f"{result.loss:.4f}", "lr": f"{target.lr:.2e}",
                                   "tokens/s": f"{tokens_per_s:.0f}"})
            if job.save_every and step % job.save_every == 0 and step < job.steps:
                save(job.overwrite or saved or in_place)
                saved = True
        save(job.overwrite or saved or in_place)
    finally:  # on failure the launcher stops every rank: no collective teardown to wait on here
        progress.close()
        if out is not None:
            out.close()
    trainer.close()
    model.close()
    return {"first_step": first, "steps": job.steps, "first_loss": losses[0], "last_loss": losses[-1],
            "save": job.save, "virtual": virtual}
