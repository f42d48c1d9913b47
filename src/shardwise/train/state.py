"""Where a training run stands: saved with its checkpoint, restored under any layout or provider.

A resumed run must go on as if it had never stopped: the same fp32 masters, the same
AdamW moments and bias-correction count, the same data. The masters and moments are
boxes of a sharded checkpoint (``sharded.State``), so they reshard like any weight. The
data order follows from (seed, step) alone (``data.TokenStream``) and nothing else in a
step draws random numbers, so the record needs no RNG state: only the step and what
identifies the token stream (seed, batch, seq, a digest of its windows and one of the order
torch's ``randperm`` draws them in, which a torch version may change). It also keeps
the run's settings (rate, schedule, clipping, ...), which a resume may change on purpose
(a lower rate, more steps) but is told about, and the dtype of the model it was trained
from, which an export of its fp32 masters writes unless told otherwise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.reader import MANIFEST, CheckpointError
from ..io.sharded import ShardedCheckpoint, State, save_sharded
from ..model.forward import Model
from ..plan.spec import DTYPES, load_spec
from ..untrusted import is_int, shown
from .data import TokenStream
from .optim import MOMENTS, AdamW

ORDER_EPOCHS = 4  # epochs whose order the digest covers: one randperm told from another even with 2 windows
MATCHING = {"windows": "the token windows (other text, or another tokenizer)",
            "order": "the order the windows are drawn in (torch.randperm shuffles them otherwise here than in the "
                     "saving run: another torch version?)"}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def stream_identity(stream: TokenStream) -> dict:
    """What must match for a resumed run to see the very batches an uninterrupted one would: the stream's settings,
    its windows, and the order it draws them in."""
    order = torch.cat([stream.order(epoch) for epoch in range(ORDER_EPOCHS)])
    return {"seed": stream.seed, "batch": stream.batch, "seq": stream.seq, "windows": _digest(stream.windows),
            "order": _digest(order)}


@dataclass(frozen=True)
class Record:
    """A training checkpoint's record: the optimizer steps taken, the stream they were taken on, the run's settings,
    and the dtype of the model it was trained from (None in records older than that field)."""

    step: int
    data: dict
    settings: dict
    dtype: torch.dtype | None = None

    @classmethod
    def read(cls, directory: str | Path) -> Record:
        with ShardedCheckpoint(directory) as ckpt:
            return cls.of(ckpt)

    @classmethod
    def of(cls, ckpt: ShardedCheckpoint) -> Record:
        """The validated record of a training checkpoint; a CheckpointError if there is none or it is malformed."""
        if not ckpt.record:
            raise CheckpointError(f"{ckpt.path}: no 'train' record: not a training checkpoint (save one with "
                                  "shardwise train, or save_training)")
        return cls.parse(ckpt.record, ckpt.path, "train.")

    @classmethod
    def parse(cls, raw: object, where: str | Path, prefix: str = "") -> Record:
        """``raw`` (untrusted JSON) validated as a record; ``where`` names its file in errors, ``prefix`` where in
        the file the record's fields are."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: the record is {shown(raw)}, expected an object")
        step, data = raw.get("step"), raw.get("data")
        if not is_int(step) or step < 1:
            raise CheckpointError(f"{where}: field '{prefix}step' is {shown(step)}, expected an integer >= 1")
        numbers, digests = ("seed", "batch", "seq"), ("windows", "order")
        if not isinstance(data, dict) or not {*numbers, "windows"} <= set(data) <= {*numbers, *digests} or not all(
                is_int(data[k]) for k in numbers) or not all(isinstance(data.get(k, ""), str) for k in digests):
            raise CheckpointError(f"{where}: field '{prefix}data' is {shown(data)}, expected integers 'seed', "
                                  "'batch', 'seq', a 'windows' digest and an 'order' digest (which checkpoints "
                                  "saved before it was kept lack)")
        settings = raw.get("settings", {})
        if not isinstance(settings, dict) or not all(
                v is None or isinstance(v, (int, float, str)) for v in settings.values()):
            raise CheckpointError(f"{where}: field '{prefix}settings' is {shown(settings)}, expected an object of "
                                  "numbers, strings and nulls")
        dtype = raw.get("dtype")
        if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
            raise CheckpointError(f"{where}: field '{prefix}dtype' is {shown(dtype)}, expected one of "
                                  f"{', '.join(DTYPES)}")
        return cls(step, data, settings, None if dtype is None else DTYPES[dtype])

    def changed(self, settings: dict) -> list[str]:
        """The settings this run gives otherwise than the saved run, each as 'name saved -> given'."""
        return [f"{k} {self.settings[k]} -> {v}" for k, v in settings.items()
                if k in self.settings and self.settings[k] != v]

    def check_resumable(self, directory: str | Path, stream: TokenStream, steps: int) -> None:
        """Refuse a resume that would not continue the saved run: other data, in another order, or no steps left to
        take. (A record saved before the order was kept cannot say what order it trained in.)"""
        given = stream_identity(stream)
        for key, saved in self.data.items():
            if given[key] != saved:
                what = MATCHING.get(key, f"--{key}")
                raise ValueError(f"{directory}: saved at step {self.step} training on {key} {saved}, but this run "
                                 f"has {given[key]}: {what} must match to resume")
        if steps <= self.step:
            raise ValueError(f"{directory}: saved at step {self.step}, so --steps {steps} leaves nothing to train; "
                             f"--steps counts every step, the saved ones too")


def trained_from(directory: str | Path) -> torch.dtype | None:
    """For a training checkpoint, the dtype of the model it was trained from (its files hold fp32 masters): its
    record's, or in a record older than that field, its config.json's (then still the base model's). None for any
    other checkpoint, whose files hold its own dtypes."""
    if not (Path(directory) / MANIFEST).is_file():
        return None
    with ShardedCheckpoint(directory) as ckpt:
        if not ckpt.record:
            return None
        return Record.of(ckpt).dtype or load_spec(directory).dtype


def base_dtype(directory: str | Path) -> torch.dtype:
    """The dtype of the model a checkpoint stands for: the one a training checkpoint was trained from, else the
    config's."""
    return trained_from(directory) or load_spec(directory).dtype


def save_training(model: Model, optimizer: AdamW, out_dir: str | Path, stream: TokenStream,
                  overwrite: bool = False, settings: dict | None = None, dtype: torch.dtype | None = None,
                  sources: list[str | Path] | None = None) -> Path:
    """Collective: a sharded checkpoint of the fp32 masters, the AdamW moments and the record, at any layout.

    ``settings`` (JSON scalars: the rate, schedule, ...) are kept for ``Record.changed``; ``dtype`` (default:
    ``base_dtype`` of the checkpoint the model was loaded from) is the base model's, which an export writes.
    ``sources`` are the directories the save must never land in (default: the one the model was loaded from)."""
    source = model.weights.source_dir
    dtype = dtype or (model.plan.spec.dtype if source is None else base_dtype(source))
    record = {"step": optimizer.steps, "data": stream_identity(stream), "settings": settings or {},
              "dtype": str(dtype).removeprefix("torch.")}
    return save_sharded(model.weights, out_dir, overwrite, State(optimizer.moments, record), sources)


def restore(directory: str | Path, model: Model, optimizer: AdamW) -> Record:
    """Fill ``optimizer`` (over ``model``, loaded from ``directory``) with the saved state; return the record.

    Each rank reads only the boxes of the moments it holds, whatever layout saved them.
    """
    if model.weights.source_dir is None or Path(model.weights.source_dir).resolve() != Path(directory).resolve():
        raise ValueError(f"rank {model.plan.rank}: restore({directory!r}): the model was loaded from "
                         f"{model.weights.source_dir}, so its masters are not the ones this state belongs to; "
                         "load the model from the training checkpoint itself")
    with ShardedCheckpoint(directory) as ckpt:
        record = Record.of(ckpt)
        ckpt.check_state(model.plan.spec, MOMENTS)
        for moment in MOMENTS:
            ckpt.read_state(model.plan, moment, optimizer.moments[moment])
    optimizer.steps = record.step
    return record
