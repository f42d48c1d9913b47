"""Reading boxes of safetensors checkpoints, and nothing else.

The header is checked in full before any data is touched (length, dtype names,
offsets inside the file, byte counts matching shapes, no overlaps), so a truncated
or lying file fails at once, naming the file and the tensor, instead of yielding
garbage weights. Data is then read box by box:

- a box that is a run of whole rows is one contiguous byte range, read with
  ``preadv`` straight into the destination (or a staging buffer when it must be cast);
- any other box (the column slice of a row-parallel matrix) is copied out of a
  temporary ``mmap`` of just its span, which is unmapped at once so file pages never
  pile up in the process's RSS.

Either way a rank touches only the bytes it owns, rounded out to the pages that hold them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from ..plan.boxes import Box, ravel
from ..plan.spec import ModelSpec
from ..untrusted import UntrustedJSON, is_int, parse_json
from ..words import plural

log = logging.getLogger("shardwise.reader")  # the name its log lines have always carried

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CASTABLE = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEADER = 100 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"
MANIFEST = "shardwise.json"


class CheckpointError(ValueError):
    """A checkpoint file is malformed or disagrees with the model config."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes live: ``begin:end`` are absolute file offsets."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def inside(directory: Path, name: object, where: str) -> Path:
    """``directory / name`` for a file name read from an untrusted index or manifest, confined to the directory.

    Refuses absolute paths, ``..``, and names that resolve (through symlinks) outside
    the directory, so a checkpoint can never make shardwise open someone else's file.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{where}: file name {name!r} is not a plain relative path")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{where}: file name {name!r} points outside the checkpoint directory")
    path = directory / rel
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in _roots(directory)):
        raise CheckpointError(f"{where}: file name {name!r} leads outside the checkpoint directory (symlink)")
    return path


def _roots(directory: Path) -> list[Path]:
    """Where a checkpoint's files may really live: its directory, and for an HF hub cache snapshot
    (``models--org--name/snapshots/REV``, whose files link to ``../../blobs``) that repo's blob store."""
    real = directory.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return roots


def _entry(path: Path, name: str, meta: object, data_start: int, size: int) -> Entry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype_name = meta.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype_name!r} (known: {', '.join(DTYPES)})")
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    lo, hi = offsets
    dtype = DTYPES[dtype_name]
    need = math.prod(shape) * dtype.itemsize
    if not 0 <= lo <= hi:
        raise CheckpointError(f"{where}: data_offsets {offsets} are not an increasing range")
    if hi - lo != need:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} span {plural(hi - lo, 'byte')} but shape {shape} of {dtype_name} needs "
            f"{need}"
        )
    if data_start + hi > size:
        raise CheckpointError(
            f"{where}: data ends at byte {data_start + hi} but the file has only {plural(size, 'byte')} (truncated?)"
        )
    return Entry(path, name, dtype, tuple(shape), data_start + lo, data_start + hi)


def open_regular(path: Path) -> int:
    """A read-only descriptor of a regular file. Never blocks: a FIFO or device planted under a checkpoint's
    file name would otherwise hang the reader, or read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: is not a regular file")
    return fd


def read_header(path: str | Path) -> dict[str, Entry]:
    """Parse and fully validate one safetensors header."""
    path = Path(path)
    with open(open_regular(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {plural(size, 'byte')} is too short to hold a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            raise CheckpointError(
                f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)"
            )
        raw = f.read(n)
    try:
        header = parse_json(raw)
    except UntrustedJSON as e:
        raise CheckpointError(f"{path}: header is {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ is not an object of strings")
    entries = {
        name: _entry(path, name, meta, 8 + n, size) for name, meta in header.items() if name != "__metadata__"
    }
    by_offset = sorted(entries.values(), key=lambda e: e.begin)
    for a, b in zip(by_offset, by_offset[1:]):
        if b.begin < a.end:
            raise CheckpointError(f"{path}: tensors {a.name!r} and {b.name!r} overlap in the data section")
    return entries


def byte_view(t: torch.Tensor):
    """A numpy byte view sharing a contiguous CPU tensor's memory, whatever its dtype (numpy has no bfloat16)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _pread_into(fd: int, buf, offset: int, entry: Entry) -> None:
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(
                f"{entry.path}: tensor {entry.name!r}: unexpected end of file at byte {offset + done}"
            )
        done += got


class Checkpoint:
    """An HF safetensors checkpoint directory: one file, or several behind an index."""

    def __init__(self, directory: str | Path, files: list[Path] | None = None):
        self.directory = Path(directory)
        self.entries: dict[str, Entry] = {}
        self._claimed: dict[str, Path] = {}
        for path in files if files is not None else self._files():
            for name, entry in read_header(path).items():
                if name in self.entries:
                    raise CheckpointError(f"{path}: tensor {name!r} is also in {self.entries[name].path}")
                self.entries[name] = entry
        self._check_index()
        self._fds: dict[Path, int] = {}

    def _files(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.exists():
            return sorted(set(self._index(index).values()))
        single = self.directory / "model.safetensors"
        if single.exists():
            return [inside(self.directory, single.name, str(single))]
        files = [inside(self.directory, p.name, str(p)) for p in sorted(self.directory.glob("*.safetensors"))]
        if not files:
            raise CheckpointError(f"{self.directory}: no safetensors files found")
        return files

    def _index(self, index: Path) -> dict[str, Path]:
        """The index's weight map (tensor -> file), every file confined to the checkpoint directory."""
        try:
            weight_map = parse_json(index.read_bytes())["weight_map"]
        except (OSError, UntrustedJSON, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is a {type(weight_map).__name__}, expected an object")
        files: dict[object, Path] = {}  # each distinct name resolved once: an index lists every tensor
        for name, f in weight_map.items():
            if not isinstance(f, str) or f not in files:  # a non-string fails in inside()
                files[f] = inside(self.directory, f, f"{index}: tensor {name!r}")
        self._claimed = {name: files[f] for name, f in weight_map.items()}
        return self._claimed

    def _check_index(self) -> None:
        """Each tensor the index names must be in the file it names: a lying index is a corrupt checkpoint."""
        for name, path in self._claimed.items():
            entry = self.entries.get(name)
            if entry is None or entry.path != path:
                found = "in no file" if entry is None else f"in {entry.path.name}"
                raise CheckpointError(f"{self.directory / INDEX_FILE}: tensor {name!r} is listed in {path.name}, "
                                      f"but it is {found}")

    def check(self, spec: ModelSpec) -> None:
        """Every tensor the config implies is present, with the shape it implies and a castable dtype."""
        for name, info in spec.tensors().items():
            entry = self.entries.get(name)
            if entry is None:
                files = sorted({str(e.path.name) for e in self.entries.values()})
                raise CheckpointError(f"{self.directory}: tensor {name!r} is missing (searched {', '.join(files)})")
            check_stored_as(entry.path, name, entry.shape, entry.dtype, info.shape)
        unused = set(self.entries) - set(spec.tensors())
        if unused:
            log.warning("%s: %d tensors are not part of the model and are ignored, e.g. %s",
                        self.directory, len(unused), sorted(unused)[0])

    def source_dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = open_regular(path)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def place(self, box: Box) -> tuple[str, int]:
        """Where the box's first byte is stored (file, offset): reading boxes in this order walks each file forward,
        as storage reads fastest, whatever order the plan lists tensors in."""
        entry = self.entries[box.source]
        return str(entry.path), entry.begin + ravel(box.start, entry.shape) * entry.dtype.itemsize

    def read(self, box: Box, dst: torch.Tensor) -> None:
        """Fill ``dst[box.local_index()]`` with the box's bytes, cast to ``dst.dtype``."""
        entry = self.entries[box.source]
        target = dst[box.local_index()]
        if is_row_run(box, entry.shape):
            self._read_rows(entry, box, target)
        else:
            self._read_strided(entry, box, target)

    def _read_rows(self, entry: Entry, box: Box, target: torch.Tensor) -> None:
        row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        offset = entry.begin + box.start[0] * row_bytes
        direct = target.dtype == entry.dtype and target.device.type == "cpu" and target.is_contiguous()
        buf = target if direct else torch.empty(box.shape, dtype=entry.dtype)
        _pread_into(self._fd(entry.path), byte_view(buf), offset, entry)
        if not direct:
            target.copy_(buf)

    def _read_strided(self, entry: Entry, box: Box, target: torch.Tensor) -> None:
        with mapped_box(entry, box, write=False) as src:
            target.copy_(src)


def check_stored_as(where: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                    expected: tuple[int, ...]) -> None:
    """A model tensor as a checkpoint stores it must have the config's shape and a floating dtype we cast."""
    if shape != expected:
        raise CheckpointError(f"{where}: tensor {name!r} has shape {list(shape)}, but config.json implies "
                              f"{list(expected)}")
    if dtype not in CASTABLE:
        raise CheckpointError(f"{where}: tensor {name!r} has dtype {DTYPE_NAMES[dtype]}, expected one of "
                              f"{', '.join(DTYPE_NAMES[d] for d in CASTABLE)}")


def is_row_run(box: Box, shape: tuple[int, ...]) -> bool:
    """Whether a box is a run of whole rows, i.e. one contiguous byte range of its tensor."""
    return box.stop[1:] == tuple(shape[1:]) and all(a == 0 for a in box.start[1:])


@contextlib.contextmanager
def mapped_box(entry: Entry, box: Box, write: bool):
    """A strided tensor view of a box's bytes in the file, through an mmap of just its span.

    The mapping is dropped on exit, so file pages do not accumulate in the process's
    RSS. With ``write`` the mapping is shared, and copies into the view land in the file.
    """
    item = entry.dtype.itemsize
    strides = [math.prod(entry.shape[d + 1 :]) for d in range(len(entry.shape))]
    first, last = ravel(box.start, entry.shape), ravel(tuple(b - 1 for b in box.stop), entry.shape) + 1
    lo = entry.begin + first * item
    base = lo - lo % mmap.ALLOCATIONGRANULARITY
    length = entry.begin + last * item - base
    # Writes prefault the span in one call: first touches of fresh file pages are otherwise one fault each.
    kind = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0) if write else mmap.MAP_PRIVATE
    with (open(entry.path, "r+b") if write else open(open_regular(entry.path), "rb") as f,
          mmap.mmap(f.fileno(), length, flags=kind, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base) as m):
        flat = torch.frombuffer(m, dtype=entry.dtype, count=last - first, offset=lo - base)
        view = flat.as_strided(box.shape, strides)
        try:
            yield view
        finally:
            del flat, view
