"""Writing safetensors files and checkpoint directories so that nothing half-written ever looks complete.

A checkpoint is built in a hidden temporary directory beside its destination and
swapped into place with one atomic rename (``renameat2(RENAME_EXCHANGE)`` when a
previous checkpoint is there), so readers see the old checkpoint or the new one,
never a mix, and a crash leaves the old one untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .reader import DTYPE_NAMES, byte_view

TMP_PREFIX = ".shardwise-tmp-"


@dataclass(frozen=True)
class Placement:
    """Where one tensor goes in a file: absolute byte offset of its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_file(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None
              ) -> tuple[bytes, list[Placement]]:
    """The header bytes of a safetensors file and where each tensor's data lands, in the given order."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    pos = 0
    for name, dtype, shape in tensors:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # keeps data 8-byte aligned, as the format recommends
    head = len(body).to_bytes(8, "little") + body
    start = len(head)
    places = [Placement(name, dtype, tuple(shape), start + header[name]["data_offsets"][0])
              for name, dtype, shape in tensors]
    return head, places


def tensor_bytes(t: torch.Tensor):
    """The bytes of a tensor's data, copied to CPU and made contiguous only where needed."""
    return byte_view(t.detach().cpu().contiguous())


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One whole safetensors file from in-memory tensors."""
    head, places = plan_file([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    with open(path, "wb") as f:
        f.write(head)
        for place in places:
            f.write(tensor_bytes(tensors[place.name]))


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


def fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory to ``out``, replacing any previous checkpoint atomically."""
    fsync_tree(tmp)
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp)
    else:  # no atomic swap here: the old checkpoint survives under a hidden name until the new one is in place
        old = out.with_name(f"{TMP_PREFIX}old-{out.name}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)


def make_temp_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the checkpoint's permissions
    return tmp


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; it becomes ``out`` only if the block finishes."""
    out = Path(out)
    tmp = make_temp_dir(out)
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _all_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (a collective; trivially local without a world)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@contextlib.contextmanager
def collective_directory(out: str | Path, rank: int, finish: Callable[[Path], None] | None = None
                         ) -> Iterator[Path]:
    """``atomic_directory`` across ranks: all ranks fill one temporary directory, published only if all succeed.

    Rank 0 creates the directory and tells the others its name. Only once every rank
    has succeeded does rank 0 run ``finish`` (writing the index or manifest, the files
    that make a directory look like a checkpoint) and publish it. Whatever a rank
    raises, it still takes part in the agreement, so its peers learn of the failure
    instead of waiting for it; the temporary directory is then removed.
    """
    out = Path(out)
    name = [str(make_temp_dir(out)) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    failure: BaseException | None = None
    try:
        yield tmp
    except BaseException as e:  # noqa: BLE001 - re-raised below, after the peers have been told
        failure = e
    published = False
    if _all_ok(failure is None) and rank == 0:
        try:
            if finish is not None:
                finish(tmp)
            publish(tmp, out)
            published = True
        except BaseException as e:  # noqa: BLE001 - re-raised below
            failure = e
    if rank == 0 and not published:
        shutil.rmtree(tmp, ignore_errors=True)
    published = _all_ok(published if rank == 0 else True)
    if failure is not None:
        raise failure
    if not published:
        raise RuntimeError(f"{out}: not written, because another rank failed (see its error)")
