"""Quantized gathers: what a ZeRO-3 gather moves when the work dtype is fp8 or int8.

Only matrices are quantized: projections, the embedding and the LM head, which are
nearly all of a block's bytes. 1-D tensors (RMSNorm gains, biases) travel in the compute
dtype: a norm gain scales every element of the hidden state, so one byte of it costs far
more accuracy than it saves bytes (torchao's fp8 FSDP2 gathers quantize only linear
weights for the same reason). A rank's wire chunk therefore holds the 1-byte codes of its
matrix elements, then its 1-D elements' raw bytes; chunks are padded to the largest over
the DP group, so the gather stays one collective of equal parts.

Each rank quantizes its own master chunk before the gather, and every rank dequantizes
the gathered block into the compute dtype. Scales are symmetric and come from an abs-max
agreed over the DP group (an all-reduce max of each rank's partial maxima), so every
rank dequantizes alike; they change only when the masters do.

Error bounds, per element ``x`` of a matrix (or row) whose largest magnitude is ``m``:

- **fp8 e4m3**, one scale per tensor, ``s = m / 448``: ``|x' - x| <= max(|x| / 16, s / 512)``.
  e4m3 keeps 3 mantissa bits, so rounding is within half a unit, 2**-4 relative, down
  to its smallest normal (2**-6); below that the subnormal step is ``2**-9 * s``.
- **int8**, one scale per output row, ``s = m / 127``: ``|x' - x| <= s / 2 = m / 254``.

The product ``q * s`` is formed in fp32, then rounded once to the compute dtype (the master
dtype), which adds its own half unit: ``|x'| * 2**-9`` more for bf16 masters, ``2**-12`` for fp16,
nothing that matters for fp32. "A tensor" is the TP-local work tensor: fused q/k/v (and gate/up)
share one fp8 scale, and a different TP degree cuts different tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan.boxes import round_up
from ..plan.flat import FlatBlock, rectangles

LIMITS = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
ALIGN = 16  # bytes: where the raw 1-D elements start in a chunk, and how chunks are padded


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in LIMITS


@dataclass(frozen=True)
class Piece:
    """Member ``member``'s elements ``a:b`` (flat, within the member) sit at byte ``at`` of a part's wire chunk."""

    member: int
    a: int
    b: int
    at: int


def wire_pieces(flat: FlatBlock, part: int, raw: torch.dtype) -> tuple[list[Piece], int]:
    """Where ``part``'s chunk puts each member's elements on the wire, and the bytes it needs.

    Matrix elements come first, one byte each, in flat order; the 1-D elements follow at an
    aligned offset, ``raw.itemsize`` bytes each.
    """
    lo, hi = flat.owned(part)
    spans = [(i, max(lo - m.offset, 0), min(hi - m.offset, m.numel)) for i, m in enumerate(flat.members)]
    spans = [(i, a, b) for i, a, b in spans if a < b]
    pieces, at = [], 0
    for i, a, b in spans:
        if len(flat.members[i].shape) == 2:
            pieces.append(Piece(i, a, b, at))
            at += b - a
    at = round_up(at, ALIGN)
    for i, a, b in spans:
        if len(flat.members[i].shape) != 2:
            pieces.append(Piece(i, a, b, at))
            at += (b - a) * raw.itemsize
    return pieces, at


def chunk_bytes(flat: FlatBlock, raw: torch.dtype) -> int:
    """Bytes of every rank's wire chunk of ``flat`` under a quantized gather: the largest part's, aligned."""
    return round_up(max(wire_pieces(flat, part, raw)[1] for part in range(flat.parts)), ALIGN)


class Quantizer:
    """Quantizes one rank's chunk of a flat block, and dequantizes the gathered block, row by row.

    ``raw`` is the dtype 1-D members travel in (the compute dtype); every rank of the DP
    group builds the same wire layout, so each can read every other's chunk.
    """

    def __init__(self, flat: FlatBlock, part: int, dtype: torch.dtype, raw: torch.dtype):
        self.flat, self.part, self.dtype, self.raw, self.limit = flat, part, dtype, raw, LIMITS[dtype]
        self.first_row: dict[int, int] = {}  # where each matrix's rows start in the scale vector
        rows = 0
        for i, m in enumerate(flat.members):
            if len(m.shape) == 2:
                self.first_row[i] = rows
                rows += m.shape[0]
        self.rows = rows
        self.chunk_bytes = chunk_bytes(flat, raw)
        self.layout = [wire_pieces(flat, p, raw)[0] for p in range(flat.parts)]

    def _matrix_parts(self, piece: Piece, elements: torch.Tensor, codes: torch.Tensor | None = None):
        """(scale rows, the elements' rectangle, the wire codes for it) for each rectangle of a matrix piece."""
        m = self.flat.members[piece.member]
        for start, lo, hi in rectangles(m.shape, piece.a, piece.b):
            shape = (hi[0] - lo[0], hi[1] - lo[1])
            n, at = shape[0] * shape[1], start - piece.a
            rows = slice(self.first_row[piece.member] + lo[0], self.first_row[piece.member] + hi[0])
            wire = None if codes is None else codes[piece.at + at : piece.at + at + n].view(shape)
            yield rows, elements[at : at + n].view(shape), wire

    def _owned(self, chunk: torch.Tensor):
        """(piece, this rank's master elements of it) for each piece of this rank's chunk."""
        base = self.part * self.flat.chunk
        for piece in self.layout[self.part]:
            offset = self.flat.members[piece.member].offset - base
            yield piece, chunk[offset + piece.a : offset + piece.b]

    def local_absmax(self, chunk: torch.Tensor) -> torch.Tensor:
        """Per-row abs-max of what this rank holds (0 for rows it holds none of): the all-reduce max's input."""
        out = torch.zeros(self.rows, dtype=torch.float32, device=chunk.device)
        for piece, elements in self._owned(chunk):
            if piece.member in self.first_row:
                for rows, view, _ in self._matrix_parts(piece, elements):
                    out[rows] = torch.maximum(out[rows], view.abs().amax(dim=1).float())
        return out

    def scales(self, absmax: torch.Tensor) -> torch.Tensor:
        """Per-row scales from the agreed abs-max: fp8 takes each tensor's largest row, int8 keeps rows apart."""
        if self.dtype == torch.float8_e4m3fn:
            absmax = absmax.clone()
            for i, first in self.first_row.items():
                rows = slice(first, first + self.flat.members[i].shape[0])
                absmax[rows] = absmax[rows].max()
        return torch.where(absmax > 0, absmax / self.limit, torch.ones_like(absmax))

    def quantize(self, chunk: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``chunk`` (master dtype) as this rank's wire bytes in ``out[:chunk_bytes]``: codes, then raw 1-D bytes."""
        out = out[: self.chunk_bytes]
        codes = out.view(self.dtype)
        for piece, elements in self._owned(chunk):
            if piece.member not in self.first_row:
                n = (piece.b - piece.a) * self.raw.itemsize
                out[piece.at : piece.at + n].view(self.raw).copy_(elements)
                continue
            for rows, src, dst in self._matrix_parts(piece, elements, codes):
                q = (src.float() / scales[rows, None]).clamp_(-self.limit, self.limit)
                dst.copy_(q.round_() if self.dtype == torch.int8 else q)
        return out

    def dequantize(self, gathered: torch.Tensor, scales: torch.Tensor, work: dict[str, torch.Tensor]) -> None:
        """Every member of the gathered block into its work tensor: matrices scaled back in fp32 and rounded once,
        1-D members copied as they came."""
        for i, m in enumerate(self.flat.members):
            dst = work[m.name]
            pieces = [(p * self.chunk_bytes, piece) for p in range(self.flat.parts) for piece in self.layout[p]
                      if piece.member == i]
            if i not in self.first_row:
                for base, piece in pieces:
                    at = base + piece.at
                    dst.view(-1)[piece.a : piece.b].copy_(gathered[at : at + (piece.b - piece.a) * self.raw.itemsize]
                                                          .view(self.raw))
                continue
            values = dst.view(-1) if dst.dtype == torch.float32 else torch.empty(m.numel, device=dst.device)
            for base, piece in pieces:
                decode(gathered[base + piece.at : base + piece.at + piece.b - piece.a], self.dtype,
                       values[piece.a : piece.b])
            first = self.first_row[i]
            values.view(m.shape).mul_(scales[first : first + m.shape[0], None])
            if values.data_ptr() != dst.data_ptr():
                dst.copy_(values.view(m.shape))


FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def decode(raw: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """Wire codes as fp32 values in ``out``. fp8 goes through a 256-entry table: torch's own fp8 -> fp32 cast on CPU
    is element by element, ~13x slower than the lookup (116 ms against 9 ms for 6.3M values)."""
    if dtype == torch.float8_e4m3fn:
        return torch.index_select(FP8_VALUES.to(raw.device), 0, raw.int(), out=out)
    return out.copy_(raw.view(dtype))
