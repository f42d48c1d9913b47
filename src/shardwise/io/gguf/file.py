"""Reading llama.cpp GGUF files, treating every byte as hostile.

A GGUF file (ggml's docs/gguf.md) is a header (magic, version, tensor and key
counts), typed key-value metadata, one info per tensor (name, dims, ggml type,
offset), then the tensor data, aligned. ``read_gguf`` checks all of it and returns
plain Python metadata and, per tensor, its exact byte span of a read-only memory map.

No number from the file is trusted: every count, length and offset is checked
against the bytes that remain before it is used to read, loop or allocate, so a
hostile file costs at most time and memory in proportion to its own size. All
reads go through ``_Cursor.span``, the one place that slices the file.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...words import plural

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp dropped it too, and no current tool writes it
ALIGNMENT_KEY, DEFAULT_ALIGNMENT = "general.alignment", 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63  # bytes: GGML_MAX_NAME is 64 including the C string's terminator
MAX_KEY = 65535  # bytes, the spec's limit
MAX_ARRAY_DEPTH = 4  # arrays of arrays are legal but unused; deep nesting could only exhaust the stack

# Fixed-size GGUF value types: type id -> (name, little-endian numpy dtype).
SCALARS: dict[int, tuple[str, str]] = {
    0: ("uint8", "<u1"), 1: ("int8", "<i1"), 2: ("uint16", "<u2"), 3: ("int16", "<i2"), 4: ("uint32", "<u4"),
    5: ("int32", "<i4"), 6: ("float32", "<f4"), 7: ("bool", "<u1"), 10: ("uint64", "<u8"), 11: ("int64", "<i8"),
    12: ("float64", "<f8"),
}
BOOL, UINT32, STRING, ARRAY = 7, 4, 8, 9
TYPE_NAMES = {**{t: name for t, (name, _) in SCALARS.items()}, STRING: "string", ARRAY: "array"}
# The fewest bytes a value of each type takes: a count times this must fit in the bytes left.
MIN_SIZE = {**{t: np.dtype(dtype).itemsize for t, (_, dtype) in SCALARS.items()}, STRING: 8, ARRAY: 4 + 8}
KV_MIN_SIZE = 8 + 4 + 1  # key length, value type, a one-byte value
TENSOR_INFO_MIN_SIZE = 8 + 4 + 8 + 4 + 8  # name length, dim count, one dim, type, offset


class GGUFError(ValueError):
    """The GGUF file is malformed or uses something shardwise cannot import."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # row-major as in HF and numpy: GGUF lists dims innermost first
    offset: int  # where ``data`` starts in the file
    data: np.ndarray  # read-only uint8 view of the file's memory map, exactly the tensor's bytes


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    alignment: int
    metadata: dict[str, object]  # plain Python values: int, float, bool, str, and (nested) lists of them
    tensors: list[GGUFTensor]


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # from the start of the data section
    size: int  # bytes


class _Cursor:
    """A position in the file that only moves forward, through reads that check the bytes exist first."""

    def __init__(self, path: Path, buf: memoryview):
        self.path, self.buf, self.pos = path, buf, 0

    def fail(self, what: str, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}: {problem}")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def span(self, start: int, n: int, what: str) -> memoryview:
        """``n`` bytes at ``start``. Slicing past the end would silently return fewer, so that is refused first."""
        if start + n > len(self.buf):
            raise self.fail(what, f"needs {plural(n, 'byte')} at offset {start}, but the file ends at {len(self.buf)}")
        return self.buf[start : start + n]

    def take(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes."""
        view = self.span(self.pos, n, what)
        self.pos += n
        return view

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, item_size: int) -> int:
        """A u64 count of items of at least ``item_size`` bytes, refused unless they can fit in the bytes left."""
        n = self.uint("<Q", what)
        if n * item_size > self.left():
            raise self.fail(what, f"{plural(n, 'item')} of at least {plural(item_size, 'byte')} cannot fit in the "
                                 f"{plural(self.left(), 'byte')} left")
        return n

    def string(self, what: str, max_bytes: int | None = None) -> str:
        n = self.uint("<Q", f"{what} length")
        if max_bytes is not None and n > max_bytes:
            raise self.fail(what, f"is {plural(n, 'byte')} long, more than the {max_bytes} allowed")
        raw = self.take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None


def read_gguf(path: str | Path) -> GGUFFile:
    """The validated contents of a GGUF file; any problem is a GGUFError naming the file, the key or tensor, and
    what was expected."""
    path = Path(path)
    cur = _Cursor(path, _map(path))
    version = _version(cur)
    n_tensors = cur.count("tensor count", TENSOR_INFO_MIN_SIZE)
    n_kv = cur.count("key count", KV_MIN_SIZE)
    metadata, alignment = _metadata(cur, n_kv)
    infos = _tensor_infos(cur, n_tensors)
    return GGUFFile(path, version, alignment, metadata, _place(cur, infos, alignment))


def _map(path: Path) -> memoryview:
    """The whole file as read-only memory, so tensors are views instead of copies (mmap refuses empty files)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def _version(cur: _Cursor) -> int:
    """Check the magic and return the version, telling apart the versions we cannot read and why."""
    magic = bytes(cur.take(min(len(MAGIC), cur.left()), "magic"))
    if magic != MAGIC:
        raise GGUFError(f"{cur.path}: not a readable GGUF file (it starts with {magic!r}, not {MAGIC!r})")
    version = cur.uint("<I", "version")
    if version in VERSIONS:
        return version
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version == 1:
        raise cur.fail("version", "GGUF v1 (32-bit counts) is no longer supported; expected version 2 or 3")
    if swapped in VERSIONS:
        raise cur.fail("version", f"{version} is version {swapped} in big-endian, which is not supported")
    raise cur.fail("version", f"expected 2 or 3, got {version}")


def _metadata(cur: _Cursor, n: int) -> tuple[dict[str, object], int]:
    """The key-value pairs, and the alignment of tensor data: the one key the container format depends on."""
    metadata: dict[str, object] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n):
        key = cur.string(f"key #{i}", MAX_KEY)
        what = f"key {key!r}"
        if key in metadata:
            raise cur.fail(what, "appears twice")
        vtype = _value_type(cur, f"{what} type")
        metadata[key] = _value(cur, vtype, what, 0)
        if key == ALIGNMENT_KEY:
            alignment = _alignment(cur, vtype, metadata[key])
    return metadata, alignment


def _value_type(cur: _Cursor, what: str) -> int:
    vtype = cur.uint("<I", what)
    if vtype not in TYPE_NAMES:
        raise cur.fail(what, f"expected a value type from 0 to 12, got {vtype}")
    return vtype


def _value(cur: _Cursor, vtype: int, what: str, depth: int) -> object:
    if vtype == STRING:
        return cur.string(what)
    if vtype == ARRAY:
        return _array(cur, what, depth + 1)
    return _numbers(cur, vtype, 1, what)[0]


def _array(cur: _Cursor, what: str, depth: int) -> list:
    """An array, whose length is bounded by the bytes left before any item is read."""
    if depth > MAX_ARRAY_DEPTH:
        raise cur.fail(what, f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
    item_type = _value_type(cur, f"{what} item type")
    n = cur.count(f"{what} length", MIN_SIZE[item_type])
    if item_type in SCALARS:
        return _numbers(cur, item_type, n, what)
    return [_value(cur, item_type, f"{what}[{i}]", depth) for i in range(n)]


def _numbers(cur: _Cursor, vtype: int, n: int, what: str) -> list:
    """``n`` numbers in one read: vocabularies hold 100k+ token types and scores."""
    values = np.frombuffer(cur.take(n * MIN_SIZE[vtype], what), SCALARS[vtype][1])
    if vtype != BOOL:
        return values.tolist()
    if n and values.max() > 1:  # any other byte is undefined behaviour for llama.cpp's C++ bool
        raise cur.fail(what, f"expected bool bytes 0 or 1, got {values.max()}")
    return values.astype(bool).tolist()


def _alignment(cur: _Cursor, vtype: int, value: object) -> int:
    """Tensor offsets are multiples of this; llama.cpp requires a uint32 power of two."""
    what = f"key {ALIGNMENT_KEY!r}"
    if vtype != UINT32:
        raise cur.fail(what, f"expected uint32, got {TYPE_NAMES[vtype]}")
    if value == 0 or value & (value - 1):
        raise cur.fail(what, f"expected a positive power of two, got {value}")
    return value


def _tensor_infos(cur: _Cursor, n: int) -> list[_TensorInfo]:
    infos: list[_TensorInfo] = []
    names: set[str] = set()
    for i in range(n):
        info = _tensor_info(cur, i)
        if info.name in names:
            raise cur.fail(f"tensor {info.name!r}", "appears twice")
        names.add(info.name)
        infos.append(info)
    return infos


def _tensor_info(cur: _Cursor, i: int) -> _TensorInfo:
    """One tensor's name, dims, type and offset, with its byte size derived from the type's block layout."""
    name = cur.string(f"tensor #{i} name", MAX_TENSOR_NAME)
    what = f"tensor {name!r}"
    n_dims = cur.uint("<I", f"{what} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(what, f"expected 1 to {MAX_DIMS} dimensions, got {n_dims}")
    dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, f"{what} dims"))
    if min(dims) < 1:
        raise cur.fail(what, f"expected dims of at least 1, got {list(dims)}")
    kind, block, type_size = _ggml_type(cur, what)
    if dims[0] % block:
        raise cur.fail(what, f"{kind.name} packs rows in blocks of {block} values, but its rows hold {dims[0]}")
    offset = cur.uint("<Q", f"{what} offset")
    return _TensorInfo(name, kind, tuple(reversed(dims)), offset, dims[0] // block * type_size * math.prod(dims[1:]))


def _ggml_type(cur: _Cursor, what: str) -> tuple[GGMLQuantizationType, int, int]:
    """A tensor's ggml type, with its block size (values) and type size (bytes per block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    type_id = cur.uint("<I", f"{what} type")
    if type_id not in GGML_QUANT_SIZES:
        raise cur.fail(what, f"expected a known ggml type, got {type_id}")
    kind = GGMLQuantizationType(type_id)
    return (kind, *GGML_QUANT_SIZES[kind])


def _place(cur: _Cursor, infos: list[_TensorInfo], alignment: int) -> list[GGUFTensor]:
    """Each tensor's bytes: in the data section (which starts at the aligned end of the header), at an aligned
    offset, inside the file, and overlapping no other tensor."""
    start = -(-cur.pos // alignment) * alignment
    tensors = [_tensor(cur, info, start, alignment) for info in infos]
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.data.nbytes > b.offset:
            raise cur.fail(f"tensor {b.name!r}", f"its data overlaps tensor {a.name!r}")
    return tensors


def _tensor(cur: _Cursor, info: _TensorInfo, start: int, alignment: int) -> GGUFTensor:
    what = f"tensor {info.name!r}"
    if info.offset % alignment:
        raise cur.fail(what, f"offset {info.offset} is not a multiple of the alignment {alignment}")
    data = np.frombuffer(cur.span(start + info.offset, info.size, f"{what} data"), np.uint8)
    return GGUFTensor(info.name, info.type, info.shape, start + info.offset, data)
