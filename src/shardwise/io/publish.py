"""Publishing checkpoint directories so that nothing half-written looks complete and nothing a user owns is lost.

A checkpoint is built in a hidden temporary directory beside its destination and
renamed into place in one atomic step, so readers see the old checkpoint or the new
one, never a mix, and a crash leaves the old one untouched. Three rules keep a user's
data safe:

- **The target is checked before any work starts, and again just before the rename.**
  An absent or empty directory is written. A checkpoint shardwise recognises, holding
  nothing else, is replaced only with ``overwrite``. Anything else (a plain file, a
  symlink, a mount point, a directory with foreign files, the current directory, the
  source itself) is refused, even with ``overwrite``.
- **The rename does what the check decided, or fails.** A target that was absent is
  created with ``RENAME_NOREPLACE``, an empty one replaced only while still empty, and
  only a checked checkpoint is exchanged; a concurrent writer can never be overwritten.
- **Only what shardwise wrote is removed.** A replaced checkpoint loses just the files
  a checkpoint is made of; whatever else turned up in the meantime stays.

A write that is killed leaves its temporary directory, marked with its owner. The next
write to the same target removes it once that owner is provably dead, and so does the
launcher whose rank it was (``remove_orphans``), as soon as it has stopped its ranks: it
reads the temporary directories they noted in its journal (``JOURNAL_ENV``). Without
``RENAME_EXCHANGE`` the replaced checkpoint waits in such a directory too, so a kill
between the two renames leaves it to the same cleanup, which puts it back if nothing took
its place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Literal

from ..untrusted import is_int
from .prompt_table import CONFIG, RECORD, TABLE_FILES, WEIGHTS
from .reader import INDEX_FILE, MANIFEST, inside

log = logging.getLogger("shardwise.publish")  # the name its log lines have always carried

TMP_PREFIX = ".shardwise-tmp-"
OWNER_FILE = ".shardwise-owner.json"
REPLACED = "replaced"  # in a parking directory (its owner says "replaced"): the checkpoint being replaced
JOURNAL_ENV = "SHARDWISE_TEMP_JOURNAL"  # set by the launcher in its ranks: a file listing their temporary directories
# Files besides the weights that make a checkpoint usable: carried through export, reshard and import.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
              "merges.txt")
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|rank-\d{5}\.safetensors")
_CHECKPOINT_FILES = {"config.json", INDEX_FILE, MANIFEST, OWNER_FILE, *SIDE_FILES, *TABLE_FILES}
_KINDS = {"model": "model checkpoint", "table": "prompt table that shardwise train saved"}
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2

Mode = Literal["create", "fill", "replace"]  # what the rename will do: the target is absent, empty, a checkpoint
Kind = Literal["model", "table"]  # what a write makes: a model's checkpoint, or a prompt table shardwise trained


class TargetError(FileExistsError):
    """The destination of a write holds something shardwise must not replace."""


def is_checkpoint_file(path: Path) -> bool:
    """A regular file of a name shardwise writes into checkpoints (symlinks never count)."""
    return (path.is_file() and not path.is_symlink()
            and (path.name in _CHECKPOINT_FILES or _WEIGHT_FILE.fullmatch(path.name) is not None))


def check_target(out: str | Path, overwrite: bool = False, sources: list[str | Path] | tuple = (),
                 kind: Kind = "model") -> Mode:
    """What writing a ``kind`` to ``out`` will do; refuse, naming the path and what is in the way, whatever could
    lose data. A checkpoint is replaced only by one of its kind."""
    out = Path(out)
    if out.is_symlink():
        raise TargetError(f"{out}: is a symbolic link; give the real directory")
    if not out.exists():
        return "create"
    if not out.is_dir():
        raise TargetError(f"{out}: is a file, not a checkpoint directory; choose another destination")
    real = out.resolve()
    if real == Path.cwd().resolve():
        raise TargetError(f"{out}: is the current directory; give a new directory for the checkpoint")
    if any(real == Path(s).resolve() for s in sources):
        raise TargetError(f"{out}: is the source checkpoint itself; write to another directory")
    if os.path.ismount(out):  # the new checkpoint is built beside it, on another filesystem: it could not move in
        raise TargetError(f"{out}: is a mount point; give a directory inside it")
    entries = sorted(out.iterdir())
    if not entries:
        return "fill"
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries if not is_checkpoint_file(p)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise TargetError(f"{out}: holds files that are not part of a checkpoint ({shown}); "
                          "shardwise never replaces them: choose another destination")
    found: Kind | None = "model" if (out / "config.json").exists() and any(
        _WEIGHT_FILE.fullmatch(p.name) for p in entries) else None
    if found is None and all((out / name).exists() for name in (CONFIG, WEIGHTS, RECORD)):
        found = "table"
    if found is None:
        raise TargetError(f"{out}: holds {', '.join(p.name for p in entries[:5])} but no checkpoint; "
                          "choose an empty or new directory")
    if found != kind:
        raise TargetError(f"{out}: holds a {_KINDS[found]}, and this writes a {_KINDS[kind]}; choose another "
                          "destination")
    if not overwrite:
        raise TargetError(f"{out}: a checkpoint is already there; pass --overwrite (overwrite=True) to replace it")
    return "replace"


def copy_side_files(source_dir: Path | None, config: dict, directory: Path) -> None:
    """config.json, and the tokenizer files a user needs to run the checkpoint (never from outside the source)."""
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in SIDE_FILES if source_dir is not None else ():
        source = inside(source_dir, name, str(source_dir))
        if source.is_file():
            shutil.copyfile(source, directory / name)


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2; False where the libc or the filesystem (NFS, some FUSE) lacks the call or the flag."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot rename {a} to {b}: {os.strerror(err)}")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(tmp: Path, out: Path, overwrite: bool, sources: list, kind: Kind = "model") -> Mode:
    """Check the target again (it may have changed while the ranks wrote) and put the directory on disk."""
    mode = check_target(out, overwrite, sources, kind)
    for p in tmp.iterdir():
        fsync_path(p)
    fsync_path(tmp)
    return mode


def _rename_new(src: Path, out: Path) -> None:
    """Rename ``src`` to ``out``, which must not exist: never replacing what another writer put there meanwhile."""
    if not _renameat2(src, out, _RENAME_NOREPLACE):
        if out.exists():  # without NOREPLACE, a last look narrows the race to nothing practical
            raise TargetError(f"{out}: appeared while the checkpoint was being written; nothing was replaced")
        os.rename(src, out)


def _swap_by_renames(tmp: Path, out: Path) -> Path:
    """Replace the checkpoint ``out`` with ``tmp`` in two renames, where the filesystem cannot exchange them.

    The old checkpoint first moves into a parking directory that is already owned, so a
    kill between the renames leaves both directories to the stale-temp cleanup, which
    puts the old one back. Returns the parking directory; if the second rename fails, the
    old checkpoint is put back before the error is raised.
    """
    park = make_temp_dir(out, replaced=True)
    moved = False
    try:
        os.rename(out, park / REPLACED)
        moved = True
        os.rename(tmp, out)
    except OSError:
        if moved:
            os.rename(park / REPLACED, out)  # if even this fails, the park (and the checkpoint in it) stays owned
        shutil.rmtree(park, ignore_errors=True)
        raise
    return park


def publish(tmp: Path, out: Path, mode: Mode) -> None:
    """Rename a sealed temporary directory to ``out``, doing exactly what ``mode`` allows, else raising.

    When this raises, nothing at ``out`` has changed. After the rename only
    best-effort steps remain: syncing the parent, removing the replaced checkpoint.
    """
    old = park = None
    if mode == "create":
        _rename_new(tmp, out)
    elif mode == "fill":
        os.rename(tmp, out)  # replaces a directory only while it is empty: files that appeared make this fail
    elif _renameat2(tmp, out, _RENAME_EXCHANGE):
        old = tmp
    else:
        park = _swap_by_renames(tmp, out)
    try:
        fsync_path(out.parent)
    except OSError as e:
        log.warning("%s: published, but its directory entry could not be synced (%s)", out, e)
    (out / OWNER_FILE).unlink(missing_ok=True)  # kept until now, so a crash never leaves an unowned temp dir
    if old is not None:
        with contextlib.suppress(OSError):  # owned like a temp dir while removed: a kill leaves it to the next write
            (old / OWNER_FILE).write_text(json.dumps(_owner(out)))
        remove_checkpoint(old)
    if park is not None:
        remove_checkpoint(park / REPLACED)
        remove_checkpoint(park)  # its owner file, last: a kill before leaves it to the next write


def remove_checkpoint(directory: Path) -> None:
    """Delete the files of a replaced checkpoint, and the directory only if nothing else is left in it.

    The new checkpoint is already published when this runs, so nothing here may fail
    the write: whatever cannot be removed is left, with a warning. A symlink swapped in
    for the old directory is never followed.
    """
    if directory.is_symlink() or not directory.is_dir():
        log.warning("%s: the replaced target is not a plain directory any more; left as it is", directory)
        return
    try:
        for p in sorted(directory.iterdir(), key=lambda p: p.name == OWNER_FILE):  # the owner file last
            if is_checkpoint_file(p):
                p.unlink()
        directory.rmdir()
    except OSError as e:
        log.warning("%s: the replaced checkpoint was left in place (%s)", directory, e)


def _proc_start(pid: int) -> str:
    """A process's start time in clock ticks ('' if unknown): with the pid, it names one process for good."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner(out: Path) -> dict:
    """Who is writing a temporary directory, precisely enough to tell later whether that process is gone."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, pidns = "", 0
    return {"target": out.name, "host": socket.gethostname(), "boot": boot, "pidns": pidns, "pid": os.getpid(),
            "start": _proc_start(os.getpid())}


def _owner_is_gone(owner: dict, out: Path) -> bool:
    """Whether the process that made a temporary directory for ``out`` has certainly ended; never guessed."""
    me = _owner(out)
    if not me["start"] or any(owner.get(k) != me[k] for k in ("target", "host", "boot", "pidns")):
        return False  # another target, machine, boot or container, or no /proc to tell: not provably dead
    pid = owner.get("pid")
    if not is_int(pid) or pid <= 0:
        return False
    return _proc_start(pid) != owner.get("start")  # gone, or the pid now belongs to another process


def _clear(tmp: Path, out: Path | None = None) -> str | None:
    """Remove the temporary directory ``tmp`` of a write to ``out`` (default: the target its owner file names) if
    that writer has certainly ended; a parked checkpoint goes back to ``out`` instead, if nothing took its place.
    What was done, or None if ``tmp`` was left alone (not provably ours, or its writer may still be running)."""
    try:
        owner = json.loads((tmp / OWNER_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return None  # not provably ours, or still being created: leave it
    if not isinstance(owner, dict) or tmp.is_symlink():
        return None
    target = owner.get("target")
    if out is None and (not isinstance(target, str) or Path(target).name != target or target in ("", ".", "..")):
        return None
    out = out or tmp.parent / target
    if not _owner_is_gone(owner, out):
        return None
    parked = tmp / REPLACED
    if owner.get("replaced") and parked.is_dir() and not parked.is_symlink() and not out.exists() \
            and not out.is_symlink():
        try:
            _rename_new(parked, out)
        except OSError:
            return None  # something took its place meanwhile, or it cannot move: left for the next look
        shutil.rmtree(tmp, ignore_errors=True)
        return f"put {out} back from {tmp}, where an interrupted write (pid {owner.get('pid')}) had parked it"
    shutil.rmtree(tmp, ignore_errors=True)
    return f"removed {tmp}, left by an interrupted write (pid {owner.get('pid')})"


def remove_stale_temps(out: Path) -> None:
    """Remove temporary directories that earlier writes to ``out`` left behind when they were killed."""
    for tmp in out.parent.glob(f"{glob.escape(TMP_PREFIX + out.name)}-*"):
        if (done := _clear(tmp, out)) is not None:
            log.info("%s", done)


def remove_orphans(journal: Path) -> list[str]:
    """The launcher's cleanup, once its ranks are stopped: each temporary directory they noted in ``journal`` that
    is still there, removed (or its parked checkpoint put back); what was done to each."""
    try:
        noted = journal.read_text().splitlines()
    except OSError:
        return []
    return [done for line in dict.fromkeys(noted) if line and (done := _clear(Path(line))) is not None]


def _note(tmp: Path) -> None:
    """Add a temporary directory to the launcher's journal, if this process is a rank of a launch that keeps one."""
    journal = os.environ.get(JOURNAL_ENV)
    if journal:
        with open(journal, "a") as f:  # one short append: whole even if another rank appends at once
            f.write(f"{tmp}\n")


def _umask() -> int:
    """The process umask, read without changing it (other threads may be creating files) where Linux tells."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(out: Path, replaced: bool = False) -> Path:
    """A hidden directory beside ``out``, marked with its owner so that it can be cleaned up if we are killed, and
    noted in the launcher's journal. ``replaced``: a parking directory, for the checkpoint ``out`` holds now."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent)).absolute()
    try:
        _note(tmp)
        (tmp / OWNER_FILE).write_text(json.dumps(_owner(out) | ({"replaced": True} if replaced else {})))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would otherwise become the checkpoint's permissions
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp
