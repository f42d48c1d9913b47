"""The identities of blocks and local tensors: strings that know what they name, so nothing parses them.

A block is what a provider hands out at once: ``embed``, a decoder layer ``layers.N`` or
``head``. A local tensor is one kind of the architecture's table within a block
(``layers.3.qkv``, ``embed``), and a ZeRO-3 master piece is such a tensor cut at a flat
offset (``layers.3.qkv@120``). Both are ``str`` subclasses, so they key dicts, print and
compare exactly as their spelling does, while carrying their parts (``block.layer``,
``name.block``, ``name.kind``) as attributes set where they are made.
"""

from __future__ import annotations


class Block(str):
    """A provider's block; ``layer`` is N for the decoder layer ``layers.N``, None for ``embed`` and ``head``."""

    layer: int | None

    def __new__(cls, name: str, layer: int | None = None) -> Block:
        block = super().__new__(cls, name)
        block.layer = layer
        return block

    @classmethod
    def of_layer(cls, n: int) -> Block:
        return cls(f"layers.{n}", n)

    def __getnewargs__(self) -> tuple[str, int | None]:
        return str(self), self.layer


EMBED, HEAD = Block("embed"), Block("head")


class TensorName(str):
    """A local tensor: the ``kind`` (a table entry's local name) in ``block``, or a master ``piece`` of it starting at
    that flat offset. Outside the decoder layers a kind's name is the tensor's (``embed``, ``lm_head``)."""

    block: Block
    kind: str
    piece: int | None

    def __new__(cls, block: Block, kind: str, piece: int | None = None) -> TensorName:
        spelled = f"{block}.{kind}" if block.layer is not None else kind
        name = super().__new__(cls, spelled if piece is None else f"{spelled}@{piece}")
        name.block, name.kind, name.piece = block, kind, piece
        return name

    def at(self, piece: int) -> TensorName:
        """This tensor's master piece starting at flat offset ``piece``."""
        return TensorName(self.block, self.kind, piece)

    @property
    def whole(self) -> TensorName:
        """The tensor a piece is cut from (itself if it is no piece)."""
        return self if self.piece is None else TensorName(self.block, self.kind)

    def __getnewargs__(self) -> tuple[Block, str, int | None]:
        return self.block, self.kind, self.piece
