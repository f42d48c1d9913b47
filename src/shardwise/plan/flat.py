"""How a rank's tensors sit in memory: buffers of views, and ZeRO-3's flat blocks cut into DP chunks.

A block (a decoder layer, the embedding, or the final norm with the LM head) is gathered
as one flat buffer, so its work tensors are views into it and a gather is one collective,
never one per tensor. Rank ``d`` of the DP group owns the flat range ``[d*c, (d+1)*c)``
with ``c = ceil(numel / dp)``: every chunk has the same size, which is what an
all-gather into one tensor needs, and no size has to divide.

A flat range of a row-major tensor is at most three rectangles (a partial row, whole
rows, a partial row), and each rectangle is a list of boxes of the HF tensors. So a
master shard is boxes like any other rank's piece: it loads, exports, saves and
reshards through the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .boxes import ShardedTensor, round_up

ALIGN = 16  # elements: members start 64-byte aligned in fp32, which keeps SIMD loads of the views aligned


@dataclass(frozen=True)
class View:
    """A tensor of ``shape`` at element ``offset`` of a buffer."""

    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Buffer:
    """One allocation holding the views of several tensors (or one tensor under several names)."""

    name: str
    numel: int
    views: tuple[View, ...]


@dataclass(frozen=True)
class FlatBlock:
    """A block's work tensors packed into ``numel`` elements and cut into ``parts`` equal chunks."""

    name: str
    members: tuple[View, ...]
    parts: int

    @property
    def numel(self) -> int:
        end = self.members[-1].offset + self.members[-1].numel if self.members else 0
        return round_up(end, ALIGN)

    @property
    def chunk(self) -> int:
        return -(-self.numel // self.parts)

    def owned(self, part: int) -> tuple[int, int]:
        """The flat range of ``part``'s chunk that holds elements (the last chunks may be short or empty)."""
        return min(part * self.chunk, self.numel), min((part + 1) * self.chunk, self.numel)

    def master_buffer(self, part: int, work: dict[str, ShardedTensor]) -> tuple[Buffer, dict[str, ShardedTensor]]:
        """``part``'s master chunk as a buffer of pieces, and each piece's boxes of the HF tensors."""
        lo, hi = self.owned(part)
        views, pieces = [], {}
        for m in self.members:
            a, b = max(lo, m.offset), min(hi, m.offset + m.numel)
            for start, rect_lo, rect_hi in rectangles(m.shape, a - m.offset, b - m.offset):
                name = m.name.at(start)
                boxes = (box.placed_within(rect_lo, rect_hi) for box in work[m.name].boxes)
                shape = tuple(y - x for x, y in zip(rect_lo, rect_hi))
                pieces[name] = ShardedTensor(name, shape, tuple(box for box in boxes if box is not None))
                views.append(View(name, m.offset + start - part * self.chunk, shape))
        return Buffer(self.name, self.chunk, tuple(views)), pieces


def pack(name: str, tensors: list[ShardedTensor], parts: int) -> FlatBlock:
    """Lay ``tensors`` out one after another, each starting ``ALIGN``-aligned."""
    members, offset = [], 0
    for t in tensors:
        members.append(View(t.name, offset, t.shape))
        offset += round_up(t.numel, ALIGN)
    return FlatBlock(name, tuple(members), parts)


def rectangles(shape: tuple[int, ...], a: int, b: int) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """The flat element range ``a:b`` of a 1-D or 2-D row-major tensor as (flat start, lo, hi) rectangles."""
    if a >= b:
        return []
    if len(shape) == 1:
        return [(a, (a,), (b,))]
    if len(shape) != 2:
        raise ValueError(f"flat blocks hold 1-D and 2-D tensors, not shape {list(shape)}")
    width = shape[1]
    (r0, c0), (r1, c1) = divmod(a, width), divmod(b, width)
    if r0 == r1:
        return [(a, (r0, c0), (r0 + 1, c1))]
    out = []
    if c0:
        out.append((a, (r0, c0), (r0 + 1, width)))
        r0 += 1
    if r1 > r0:
        out.append((r0 * width, (r0, 0), (r1, width)))
    if c1:
        out.append((r1 * width, (r1, 0), (r1 + 1, c1)))
    return out
