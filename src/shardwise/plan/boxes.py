"""Sharding as data: a rank's piece of a tensor is a list of boxes.

A box says "the index range ``start:stop`` of checkpoint tensor ``source`` lives at
``offset`` in my local tensor". Loading reads boxes, export writes them back, and
resharding intersects two box lists. TP column/row splits, fused QKV and gate/up,
uneven splits and pipeline stages are all just different box lists, so no code path
is specific to one parallel style.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K")


@dataclass(frozen=True)
class Box:
    source: str
    start: tuple[int, ...]
    stop: tuple[int, ...]
    offset: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def same_bytes(self, other: Box) -> bool:
        """Whether two boxes hold the same elements of the same tensor, wherever each places them locally."""
        return (self.source, self.start, self.stop) == (other.source, other.start, other.stop)

    def source_index(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def local_index(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))

    def intersect(self, start: tuple[int, ...], stop: tuple[int, ...]) -> Box | None:
        """The part of this box inside the source range ``start:stop``, placed where it lands locally."""
        lo = tuple(max(a, b) for a, b in zip(self.start, start))
        hi = tuple(min(a, b) for a, b in zip(self.stop, stop))
        if any(a >= b for a, b in zip(lo, hi)):
            return None
        offset = tuple(o + a - s for o, a, s in zip(self.offset, lo, self.start))
        return Box(self.source, lo, hi, offset)

    def minus(self, start: tuple[int, ...], stop: tuple[int, ...]) -> list[Box]:
        """The parts of this box outside the source range ``start:stop``: disjoint boxes, placed where they land.

        Peeling one dimension at a time (the slab below the range, the slab above, then
        narrowing to the range in that dimension) gives at most two boxes per dimension.
        """
        if self.intersect(start, stop) is None:
            return [self]
        out: list[Box] = []
        lo, hi = list(self.start), list(self.stop)
        for d in range(len(lo)):
            if lo[d] < start[d]:
                out.append(self.intersect(tuple(lo), (*hi[:d], start[d], *hi[d + 1 :])))
                lo[d] = start[d]
            if hi[d] > stop[d]:
                out.append(self.intersect((*lo[:d], stop[d], *lo[d + 1 :]), tuple(hi)))
                hi[d] = stop[d]
        return out

    def placed_within(self, lo: tuple[int, ...], hi: tuple[int, ...]) -> Box | None:
        """The part of this box that lands inside the *local* range ``lo:hi``, placed relative to ``lo``.

        The inverse view of ``intersect``: cutting a local tensor into pieces (a ZeRO-3
        master shard) gives each piece the source ranges of exactly its own elements.
        """
        end = tuple(o + n for o, n in zip(self.offset, self.shape))
        a = tuple(max(x, y) for x, y in zip(self.offset, lo))
        b = tuple(min(x, y) for x, y in zip(end, hi))
        if any(x >= y for x, y in zip(a, b)):
            return None
        start = tuple(s + x - o for s, x, o in zip(self.start, a, self.offset))
        stop = tuple(s + y - o for s, y, o in zip(self.start, b, self.offset))
        return Box(self.source, start, stop, tuple(x - y for x, y in zip(a, lo)))

    def to_json(self) -> dict:
        return {"source": self.source, "start": list(self.start), "stop": list(self.stop), "offset": list(self.offset)}


@dataclass(frozen=True)
class ShardedTensor:
    """A local tensor described by its shape and the checkpoint boxes that fill it."""

    name: str
    shape: tuple[int, ...]
    boxes: tuple[Box, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def first_holders(held: Iterable[tuple[K, Box]]) -> Iterator[tuple[K, Box]]:
    """Each (holder, box) less the elements an earlier box of the same tensor holds: every element once.

    The one rule for "these are the same bytes" where boxes may overlap without being equal
    (a KV head replicated over TP ranks, cut at different ZeRO-3 chunk edges; a tied
    embedding on two stages): an element belongs to the first box that holds it, and each
    later box keeps only what is left of it, as disjoint boxes placed where they land.
    Ownership (the lowest rank), a sharded checkpoint's replicated pieces (the first file)
    and the bytes a load reads all come from it.
    """
    before: dict[str, list[Box]] = {}
    for holder, box in held:
        rest = [box]
        for other in before.get(box.source, ()):
            rest = [part for piece in rest for part in piece.minus(other.start, other.stop)]
        before.setdefault(box.source, []).append(box)
        yield from ((holder, piece) for piece in rest)


def full_box(source: str, shape: tuple[int, ...]) -> Box:
    """The whole of a tensor, as for replicated norms."""
    return Box(source, (0,) * len(shape), tuple(shape), (0,) * len(shape))


def rows(source: str, shape: tuple[int, ...], lo: int, hi: int, at: int = 0) -> Box:
    """Rows ``lo:hi`` of a tensor, placed at row ``at``: column-parallel and vocab-parallel pieces."""
    return Box(source, (lo, *([0] * (len(shape) - 1))), (hi, *shape[1:]), (at, *([0] * (len(shape) - 1))))


def cols(source: str, shape: tuple[int, int], lo: int, hi: int) -> Box:
    """Columns ``lo:hi`` of a matrix: row-parallel pieces (o_proj, down_proj)."""
    return Box(source, (0, lo), (shape[0], hi), (0, 0))


def ravel(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """The row-major flat position of ``index`` in a tensor of ``shape``: where a box's corner sits in a flat
    buffer or in a file's bytes."""
    return sum(i * math.prod(shape[d + 1:]) for d, i in enumerate(index))


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``: alignment of offsets and sizes in buffers."""
    return -(-n // multiple) * multiple


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges covering ``range(n)``; the first ``n % parts`` are one longer."""
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for p in range(parts):
        hi = lo + base + (p < extra)
        out.append((lo, hi))
        lo = hi
    return out
