"""Writing one checkpoint directory from many ranks, in steps that every rank agrees on.

Each step runs on every rank, then all ranks exchange their outcome, so a failure
anywhere (a full disk, a bad tensor, a target that changed) ends every rank within
seconds with an error naming the rank and the step, and nothing is published. No
collective ever runs inside a step, so a rank that fails cannot leave its peers
waiting in a collective it will never join. The filesystem side (checking the
target, the temporary directory, the atomic rename) is ``publish``'s.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..words import listed
from .publish import Kind, Mode, TargetError, check_target, make_temp_dir, publish, seal

Step = tuple[str, Callable[[Path], Any]]
Finish = Callable[[Path, dict[str, list[Any]]], None]  # the temporary directory, and each step's value from every rank


class WriteError(OSError):
    """A collective write failed on some rank; nothing was published."""


def _agree(out: Path, step: str, error: BaseException | None, value: Any, collective: bool,
           to_leader: bool = False) -> list[Any]:
    """Every rank's ``value`` for ``step``, once all finished it; raises on every rank if any failed.

    With ``to_leader`` only rank 0 receives the values (the others get Nones): a data step's
    values are what rank 0 writes into the manifest, and sending every rank's to every rank
    would cost the world size squared. A KeyboardInterrupt or SystemExit is re-raised as
    itself once the peers have been told, so the caller's own handling of Ctrl-C still works.
    """
    mine = (None if error is None else f"{type(error).__name__}: {error}", None if to_leader else value)
    everyone = [mine]
    if collective:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if to_leader:
            values = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(value if error is None else None, values, dst=0)
            everyone = [(message, v) for (message, _), v in zip(everyone, values or [None] * len(everyone))]
    elif to_leader:
        everyone = [(mine[0], value)]
    if error is not None and not isinstance(error, Exception):
        raise error
    failed = [(r, message) for r, (message, _) in enumerate(everyone) if message is not None]
    if failed:
        r, message = failed[0]
        others = f" (and {listed('rank', [r for r, _ in failed[1:]])})" if len(failed) > 1 else ""
        raise WriteError(f"{out}: not written: rank {r}{others} failed while {step}: {message}") from error
    return [v for _, v in everyone]


def _run_step(step: str, fn: Callable[[], Any]) -> tuple[BaseException | None, Any]:
    """Run this rank's part of a step, catching its failure so that the agreement still happens."""
    try:
        return None, fn()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the agreement, then it is re-raised
        return e, None


def write_checkpoint(out: str | Path, steps: list[Step], finish: Finish | None = None, *,
                     rank: int | None = None, overwrite: bool = False, sources: list[str | Path] | tuple = (),
                     agreed: str = "", kind: Kind = "model") -> Path:
    """Write a checkpoint directory: collectively over the world when ``rank`` is given, else in this process.

    ``kind`` is what it writes, which replaces only its kind (``publish.check_target``). ``agreed`` is a digest
    of what every rank planned (e.g. the file headers), refused
    unless equal everywhere. The steps fill the temporary directory (each rank decides
    what it writes, and what it returns reaches rank 0); once all succeeded, rank 0 runs
    ``finish`` (writing the index or manifest, the files that make a directory look like a
    checkpoint) with every rank's value of each step, seals and
    publishes. On failure, rank 0 removes the temporary directory and every rank raises
    ``WriteError`` naming the failed rank and step; the previous checkpoint is untouched.
    """
    out, sources, collective = Path(out), list(sources), rank is not None and dist.is_initialized()
    leader = rank in (None, 0)
    made: list[Path] = []  # the leader's temporary directory, once it exists
    values: dict[str, list[Any]] = {}  # each step's value on every rank
    mode: list[Mode] = []
    renamed = False

    def step(name: str, fn: Callable[[], Any], to_leader: bool = False) -> list[Any]:
        error, value = _run_step(name, fn)
        return _agree(out, name, error, value, collective, to_leader)

    def check() -> str:
        check_target(out, overwrite, sources, kind)
        return agreed

    def create() -> str | None:
        if leader:
            made.append(make_temp_dir(out))
            return str(made[0])
        return None

    def prepare() -> None:
        if leader:
            if finish is not None:
                finish(made[0], values)
            mode.append(seal(made[0], out, overwrite, sources, kind))

    def commit() -> None:
        nonlocal renamed
        if leader:
            publish(made[0], out, mode[0])
            renamed = True

    try:
        plans = step("checking the target", check)
    except WriteError as e:
        if isinstance(e.__cause__, TargetError):
            raise e.__cause__ from None  # the refusal itself says best what is in the way
        raise
    if len(set(plans)) != 1:
        raise WriteError(f"{out}: not written: the ranks planned different files; "
                         "do they load the same checkpoint and config?")
    try:
        tmp = Path(step("creating the directory", create)[0])
        for name, fn in steps:
            values[name] = step(name, lambda fn=fn: fn(tmp), to_leader=True)
        step("publishing", prepare)  # the last point where any rank can still call it off
        step("renaming into place", commit)
    finally:
        if made and not renamed:  # publish() changes nothing when it raises: the directory is still ours
            shutil.rmtree(made[0], ignore_errors=True)
    return out
