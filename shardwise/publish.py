"""Publishing checkpoint directories so that nothing half-written looks complete and nothing a user owns is lost.

A checkpoint is built in a hidden temporary directory beside its destination and
swapped into place with one atomic rename (``renameat2(RENAME_EXCHANGE)`` when a
previous checkpoint is there), so readers see the old checkpoint or the new one,
never a mix, and a crash leaves the old one untouched.

Three rules keep a user's data safe:

- **The target is checked before any work starts.** An absent or empty directory is
  written. A checkpoint shardwise recognises, holding nothing else, is replaced only
  with ``overwrite``. Anything else (a plain file, a symlink, a directory with foreign
  files, the current directory, the source itself) is refused, even with ``overwrite``.
- **Only what shardwise wrote is removed.** A replaced checkpoint loses just the files
  a checkpoint is made of; whatever else turned up in the meantime stays.
- **Ranks agree after every step.** Each step runs on every rank, then all ranks
  exchange their outcome, so a failure anywhere ends every rank at once with an error
  naming the rank and the step. No collective ever runs inside a step, so a rank that
  fails cannot leave its peers waiting in a collective it will never join.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .reader import INDEX_FILE, MANIFEST

log = logging.getLogger(__name__)

TMP_PREFIX = ".shardwise-tmp-"
OWNER_FILE = ".shardwise-owner.json"
# Files besides the weights that make a checkpoint usable: carried through export, reshard and import.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
              "merges.txt")
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|rank-\d{5}\.safetensors")
_CHECKPOINT_FILES = {"config.json", INDEX_FILE, MANIFEST, OWNER_FILE, *SIDE_FILES}

Step = tuple[str, Callable[[Path], Any]]


class TargetError(FileExistsError):
    """The destination of a write holds something shardwise must not replace."""


class WriteError(OSError):
    """A collective write failed on some rank; nothing was published."""


def is_checkpoint_file(path: Path) -> bool:
    """A regular file of a name shardwise writes into checkpoints (symlinks never count)."""
    return (path.is_file() and not path.is_symlink()
            and (path.name in _CHECKPOINT_FILES or _WEIGHT_FILE.fullmatch(path.name) is not None))


def check_target(out: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()) -> None:
    """Refuse, naming the path and what is in the way, any target whose replacement could lose a user's data."""
    out = Path(out)
    if out.is_symlink():
        raise TargetError(f"{out}: is a symbolic link; give the real directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise TargetError(f"{out}: is a file, not a checkpoint directory; choose another destination")
    real = out.resolve()
    if real == Path.cwd().resolve():
        raise TargetError(f"{out}: is the current directory; give a new directory for the checkpoint")
    if any(real == Path(s).resolve() for s in sources):
        raise TargetError(f"{out}: is the source checkpoint itself; write to another directory")
    entries = sorted(out.iterdir())
    if not entries:
        return
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries if not is_checkpoint_file(p)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise TargetError(f"{out}: holds files that are not part of a checkpoint ({shown}); "
                          "shardwise never replaces them: choose another destination")
    if not ((out / "config.json").exists() and any(_WEIGHT_FILE.fullmatch(p.name) for p in entries)):
        raise TargetError(f"{out}: holds {', '.join(p.name for p in entries[:5])} but no checkpoint; "
                          "choose an empty or new directory")
    if not overwrite:
        raise TargetError(f"{out}: a checkpoint is already there; pass --overwrite (overwrite=True) to replace it")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the call does not exist."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(directory: Path) -> None:
    """Delete the files of a replaced checkpoint, and the directory only if nothing else is left in it.

    The new checkpoint is already published when this runs, so nothing here may fail
    the write: whatever cannot be removed is left, with a warning.
    """
    try:
        for p in directory.iterdir():
            if is_checkpoint_file(p):
                p.unlink()
        directory.rmdir()
    except OSError as e:
        log.warning("%s: the replaced checkpoint was left in place (%s)", directory, e)


def seal(tmp: Path, out: Path, overwrite: bool) -> None:
    """Make a finished temporary directory ready to publish: target still safe, owner mark gone, all on disk."""
    check_target(out, overwrite)  # again: the target may have changed while the ranks were writing
    (tmp / OWNER_FILE).unlink()
    for p in tmp.iterdir():
        fsync_path(p)
    fsync_path(tmp)


def publish(tmp: Path, out: Path) -> None:
    """Move a sealed temporary directory to ``out``, replacing a previous checkpoint atomically.

    Only the rename can fail; after it, the new checkpoint is in place and only
    best-effort cleanup remains.
    """
    old = None
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        old = tmp
    else:  # no atomic swap here: the old checkpoint survives under a hidden name until the new one is in place
        old = out.with_name(f".shardwise-old-{out.name}-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
    if old is not None:
        remove_checkpoint(old)
    try:
        fsync_path(out.parent)
    except OSError as e:
        log.warning("%s: published, but its directory entry could not be synced (%s)", out, e)


def _owner() -> dict:
    """Who is writing a temporary directory, precisely enough to tell later whether that process is gone."""
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return ""

    stat = read(f"/proc/{os.getpid()}/stat")
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"),
            "pidns": os.stat("/proc/self/ns/pid").st_ino if os.path.exists("/proc/self/ns/pid") else 0,
            "pid": os.getpid(), "start": stat.rsplit(")", 1)[-1].split()[19] if stat else ""}


def _owner_is_gone(owner: dict) -> bool:
    """Whether the process that made a temporary directory has certainly ended (never guessed across hosts)."""
    me = _owner()
    if any(owner.get(k) != me[k] for k in ("host", "boot", "pidns")) or not isinstance(owner.get("pid"), int):
        return False
    try:
        stat = Path(f"/proc/{owner['pid']}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[19] != owner.get("start")  # the pid was reused by another process


def remove_stale_temps(out: Path) -> None:
    """Remove temporary directories that earlier writes to ``out`` left behind when they were killed."""
    for tmp in out.parent.glob(f"{TMP_PREFIX}{out.name}-*"):
        try:
            owner = json.loads((tmp / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not provably ours, or still being created: leave it
        if isinstance(owner, dict) and not tmp.is_symlink() and _owner_is_gone(owner):
            log.info("removing %s, left by an interrupted write (pid %s)", tmp, owner.get("pid"))
            shutil.rmtree(tmp, ignore_errors=True)


def make_temp_dir(out: Path) -> Path:
    """A hidden directory beside ``out``, marked with its owner so that it can be cleaned up if we are killed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the checkpoint's permissions
    (tmp / OWNER_FILE).write_text(json.dumps(_owner()))
    return tmp


def _agree(out: Path, step: str, rank: int, error: BaseException | None, value: Any = None) -> list[Any]:
    """Every rank's ``value`` for ``step``, once all finished it; raises on every rank if any failed."""
    mine = (None if error is None else f"{type(error).__name__}: {error}", value)
    everyone = [mine]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    failed = [(r, message) for r, (message, _) in enumerate(everyone) if message is not None]
    if failed:
        r, message = failed[0]
        others = f" (and ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise WriteError(f"{out}: not written: rank {r}{others} failed while {step}: {message}") from error
    return [v for _, v in everyone]


def _run_step(step: str, fn: Callable[[], Any]) -> tuple[BaseException | None, Any]:
    """Run this rank's part of a step, catching its failure so that the agreement still happens."""
    try:
        return None, fn()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the agreement, then it is re-raised
        return e, None


def _step(out: Path, step: str, rank: int, fn: Callable[[], Any]) -> list[Any]:
    """Run a step on this rank, then agree on it with every rank: each rank's value, or WriteError everywhere."""
    error, value = _run_step(step, fn)
    return _agree(out, step, rank, error, value)


def write_checkpoint(out: str | Path, steps: list[Step], finish: Callable[[Path], None] | None = None, *,
                     rank: int = 0, overwrite: bool = False, sources: Iterable[str | Path] = (),
                     agreed: str = "") -> Path:
    """Write a checkpoint directory collectively: every rank runs every step, and all agree after each.

    ``agreed`` is a digest of what every rank planned (e.g. the file headers), refused
    unless equal everywhere. The steps fill the temporary directory (each rank decides
    what it writes); once all succeeded, rank 0 runs ``finish`` (writing the index or
    manifest, the files that make a directory look like a checkpoint) and publishes. On
    failure, rank 0 removes the temporary directory and every rank raises ``WriteError``
    naming the failed rank and step; the previous checkpoint is untouched.
    """
    out, sources = Path(out), list(sources)

    def check() -> str:
        check_target(out, overwrite, sources)
        return agreed

    error, plan = _run_step("checking the target", check)
    try:
        plans = _agree(out, "checking the target", rank, error, plan)
    except WriteError:
        if isinstance(error, TargetError):
            raise error from None  # the refusal itself says best what is in the way
        raise
    if len(set(plans)) != 1:
        raise WriteError(f"{out}: not written: the ranks planned different files; "
                         "do they load the same checkpoint and config?")
    made: list[Path] = []  # rank 0's temporary directory, once it exists
    renamed = False

    def create() -> str | None:
        if rank == 0:
            made.append(make_temp_dir(out))
            return str(made[0])
        return None

    def prepare() -> None:
        if rank == 0:
            if finish is not None:
                finish(made[0])
            seal(made[0], out, overwrite)

    def commit() -> None:
        nonlocal renamed
        if rank == 0:
            publish(made[0], out)
            renamed = True

    try:
        tmp = Path(_step(out, "creating the directory", rank, create)[0])
        for step, fn in steps:
            _step(out, step, rank, lambda fn=fn: fn(tmp))
        _step(out, "publishing", rank, prepare)  # the last point where any rank can still call it off
        _step(out, "publishing", rank, commit)
    finally:
        if made and not renamed:  # publish() raises only before its rename: the directory is still ours
            shutil.rmtree(made[0], ignore_errors=True)
    return out
