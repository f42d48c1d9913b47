"""The sharded checkpoint: one safetensors file per rank, plus a manifest of boxes.

Saving is each rank writing the boxes it owns (``RankPlan.owned``: every element of the
model is owned by one rank, so replicas are stored once) in one sequential file, the
fastest a save can be. The manifest records, for every stored tensor, which box of which
HF tensor it holds. Loading under another layout (any TP, PP or world size) asks for
boxes of HF tensors; each request is intersected with the stored boxes and becomes
reads of just the overlapping bytes of the rank files that hold them.

A training checkpoint also stores a ``State``: tensors laid out like the weights (the
optimizer's moments), saved as boxes of namespaced HF names (``exp_avg/model.norm.weight``)
so they reshard exactly as the weights do, and a JSON record of where training stands.
The weights are then the fp32 masters themselves, not a cast back to the source dtype.

An int8 weight-only model saves its projections as they are: int8 boxes, and beside each the
scales of its rows as a box of ``int8_scale/<HF name>`` (one per output row), so they reshard
as the weights do and load bit-exact at any TP degree.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..model.weight_only import Int8Weight, quantized
from ..plan.boxes import Box, ShardedTensor, first_holders
from ..plan.mesh import Layout, LayoutError
from ..plan.rank import PROVIDERS, RankPlan, plan_rank
from ..plan.series import Series, SeriesError
from ..plan.spec import ModelSpec, naming_dtype
from ..untrusted import UntrustedJSON, is_int, parse_json, shown
from ..words import plural
from .collective_write import write_checkpoint
from .publish import copy_side_files
from .reader import CASTABLE, DTYPE_NAMES, DTYPES, MANIFEST, Checkpoint, CheckpointError, check_stored_as, inside
from .writer import save_safetensors

if TYPE_CHECKING:
    from ..providers.weights import Weights

FORMAT = "shardwise.sharded/1"
SCALES = "int8_scale"  # the namespace of an int8 weight-only tensor's per-row scales


@dataclass(frozen=True)
class Piece:
    """A stored tensor ``tensor`` in rank file ``file`` holds ``box`` of an HF tensor."""

    file: str
    tensor: str
    box: Box


def _field(value: object, name: str | None, kind: type, path: Path):
    """A manifest field of the expected JSON type, or a CheckpointError naming it."""
    if not (is_int(value) if kind is int else isinstance(value, kind)):
        what = f"field {name!r}" if name else "the manifest"
        raise CheckpointError(f"{path}: {what} is {shown(value)}, expected {kind.__name__}")
    return value


def _ints(value: object, name: str, path: Path) -> tuple[int, ...]:
    items = _field(value, name, list, path)
    if not all(is_int(x) and x >= 0 for x in items):
        raise CheckpointError(f"{path}: field {name!r} is {shown(value)}, expected non-negative integers")
    return tuple(items)


MAX_COVER_CELLS = 1 << 24


def _coverage(path: Path, name: str, shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]
              ) -> tuple[list[list[int]], np.ndarray]:
    """How many boxes cover each cell of the grid that the boxes' edges cut a tensor into.

    Every cell lies wholly inside or outside each box, so counting cells is exact at
    any tensor size, and costs only (number of edges) ** ndim.
    """
    cuts = [sorted({0, n, *(lo[d] for lo, _ in boxes), *(hi[d] for _, hi in boxes)}) for d, n in enumerate(shape)]
    if math.prod(len(c) - 1 for c in cuts) > MAX_COVER_CELLS:
        raise CheckpointError(f"{path}: tensor {name!r} is cut into too many pieces ({len(boxes)}) to check")
    counts = np.zeros([len(c) - 1 for c in cuts], dtype=np.int32)
    for lo, hi in boxes:
        counts[tuple(slice(bisect.bisect_left(c, a), bisect.bisect_left(c, b)) for c, a, b in zip(cuts, lo, hi))] += 1
    return cuts, counts


def _check_covered(path: Path, name: str, shape: tuple[int, ...], boxes: list[Box]) -> None:
    """Raise unless the pieces cover every element of an HF tensor: a gap would load as silent zeros."""
    if 0 in shape:
        return
    cuts, counts = _coverage(path, name, shape, [(b.start, b.stop) for b in boxes])
    if not counts.all():
        at = [c[i] for c, i in zip(cuts, np.argwhere(counts == 0)[0])]
        raise CheckpointError(f"{path}: tensor {name!r} is not fully stored: no piece covers index {at} "
                              f"of its shape {list(shape)}")


def _check_disjoint(path: Path, name: str, shape: tuple[int, ...], boxes: list[Box]) -> None:
    """Raise if two pieces claim the same elements of one stored tensor: one of them must be lying."""
    places = [(b.offset, tuple(o + n for o, n in zip(b.offset, b.shape))) for b in boxes]
    cuts, counts = _coverage(path, name, shape, places)
    if (counts > 1).any():
        at = [c[i] for c, i in zip(cuts, np.argwhere(counts > 1)[0])]
        raise CheckpointError(f"{path}: tensor {name!r}: several pieces claim its element {at}")


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def stored_name(box: Box) -> str:
    """The name a rank file stores an owned box under: its HF tensor and where the box starts in it.

    Owned boxes are disjoint, so no two of one rank share a start."""
    return f"{box.source}@{','.join(map(str, box.start))}"


def namespaced(namespace: str, name: str) -> str:
    """The name a state tensor is stored under; no HF tensor name holds a '/'."""
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class State:
    """What a training checkpoint stores beside the weights.

    ``tensors[namespace][held name]`` is laid out like the weight of that name (same
    shape, same boxes); ``record`` is JSON, the same on every rank.
    """

    tensors: dict[str, dict[str, torch.Tensor]]
    record: dict


class ShardedCheckpoint:
    """A sharded checkpoint, its manifest validated in full before any byte of data is read.

    The manifest is untrusted input: every field is type-checked, file names stay inside
    the directory, pieces lie within their HF tensor and together cover all of it (a
    gap would load as silent zeros), and each piece is checked against the stored
    tensor's header (shape and dtype) when its rank file is first opened.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / MANIFEST
        try:
            manifest = parse_json(self.path.read_bytes())
        except (OSError, UntrustedJSON) as e:
            raise CheckpointError(f"{self.path}: not a readable shardwise manifest ({e})") from None
        root = _field(manifest, None, dict, self.path)
        if root.get("format") != FORMAT:
            raise CheckpointError(f"{self.path}: format {root.get('format')!r}, expected {FORMAT!r}")
        self.layout = self._layout(root.get("layout"))
        self.tensors = self._tensors(root.get("tensors"))
        self.record = _field(root.get("train", {}), "train", dict, self.path)  # a training checkpoint's; else {}
        weight_only = _field(root.get("weight_only", {}), "weight_only", dict, self.path)
        self.int8_head: bool | None = None  # int8 weight-only: whether the LM head is int8 too; None: not quantized
        self.int8_dtypes: dict[str, torch.dtype] = {}  # each int8 tensor's dtype before quantizing, which export writes
        if weight_only:
            self.int8_head = _field(weight_only.get("int8_head"), "weight_only.int8_head", bool, self.path)
            for name, dtype in _field(weight_only.get("dtypes"), "weight_only.dtypes", dict, self.path).items():
                if not isinstance(dtype, str) or dtype not in DTYPES or DTYPES[dtype] not in CASTABLE:
                    raise CheckpointError(f"{self.path}: weight_only.dtypes: tensor {name!r} has dtype {shown(dtype)}, "
                                          f"expected one of {', '.join(DTYPE_NAMES[d] for d in CASTABLE)}")
                self.int8_dtypes[name] = DTYPES[dtype]
        self.pieces: dict[str, list[Piece]] = {}
        self.stored: dict[str, list[Piece]] = {}  # every piece of each rank file, replicas included
        pieces = list(self._pieces(root.get("files")))
        for piece in pieces:
            self.stored.setdefault(piece.file, []).append(piece)
        for piece, box in first_holders((p, p.box) for p in pieces):  # older saves store replicas: read each once
            self.pieces.setdefault(box.source, []).append(Piece(piece.file, piece.tensor, box))
        for name, (shape, _) in self.tensors.items():
            _check_covered(self.path, name, shape, [p.box for p in self.pieces.get(name, [])])
        self._files: dict[str, Checkpoint] = {}

    def _layout(self, raw: object) -> Layout:
        layout = _field(raw, "layout", dict, self.path)
        tp, pp = (_field(layout.get(k), f"layout.{k}", int, self.path) for k in ("tp", "pp"))
        dp, ep = (_field(layout.get(k, 1), f"layout.{k}", int, self.path) for k in ("dp", "ep"))
        placement = _field(layout.get("expert_placement", "contiguous"), "layout.expert_placement", str, self.path)
        self.provider = _field(layout.get("provider", "resident"), "layout.provider", str, self.path)
        if self.provider not in PROVIDERS:
            raise CheckpointError(f"{self.path}: field 'layout.provider' is {shown(self.provider)}, expected one of "
                                  f"{', '.join(PROVIDERS)}")
        declared = _field(layout.get("series", []), "layout.series", list, self.path)
        try:
            self.series = tuple(Series.parse(_field(s, "layout.series[]", str, self.path)) for s in declared)
        except SeriesError as e:
            raise CheckpointError(f"{self.path}: field 'layout.series': {e}") from None
        try:
            return Layout(tp, pp, dp, ep=ep, expert_placement=placement)
        except LayoutError as e:
            raise CheckpointError(f"{self.path}: field 'layout': {e}") from None

    def _tensors(self, raw: object) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {}
        for name, t in _field(raw, "tensors", dict, self.path).items():
            where = f"tensors.{name}"
            t = _field(t, where, dict, self.path)
            shape = _ints(t.get("shape"), f"{where}.shape", self.path)
            if not isinstance(t.get("dtype"), str) or t["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r}: field 'dtype' is {t.get('dtype')!r}, "
                                      f"expected one of {', '.join(DTYPES)}")
            out[name] = (shape, DTYPES[t["dtype"]])
        return out

    def _pieces(self, raw: object) -> Iterator[Piece]:
        for i, f in enumerate(_field(raw, "files", list, self.path)):
            f = _field(f, f"files[{i}]", dict, self.path)
            file = inside(self.directory, f.get("file"), f"{self.path}: files[{i}].file")
            for j, p in enumerate(_field(f.get("pieces"), f"files[{i}].pieces", list, self.path)):
                where = f"files[{i}].pieces[{j}]"
                yield self._piece(_field(p, where, dict, self.path), file, where)

    def _piece(self, p: dict, file: Path, where: str) -> Piece:
        tensor, source = p.get("tensor"), p.get("source")
        if not isinstance(tensor, str) or not isinstance(source, str):
            raise CheckpointError(f"{self.path}: {where}: tensor {tensor!r} and source {source!r}: expected the names "
                                  "of the stored tensor and of the HF tensor it holds")
        if source not in self.tensors:
            raise CheckpointError(f"{self.path}: {where}: tensor {source!r} is missing from 'tensors'")
        shape = self.tensors[source][0]
        start, stop, offset = (_ints(p.get(k), f"{where}.{k}", self.path) for k in ("start", "stop", "offset"))
        if not len(start) == len(stop) == len(offset) == len(shape) or not all(
                0 <= a < b <= n for a, b, n in zip(start, stop, shape)):
            raise CheckpointError(f"{self.path}: tensor {source!r}: {where} spans {list(start)}..{list(stop)}, "
                                  f"which does not fit its shape {list(shape)}")
        return Piece(str(file.relative_to(self.directory)), tensor, Box(source, start, stop, offset))

    def check(self, spec: ModelSpec) -> None:
        """Every tensor the config implies is stored, as its shape and a castable dtype; the layout fits the model."""
        for name, info in spec.tensors().items():
            if name not in self.tensors or name not in self.pieces:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
            shape, dtype = self.tensors[name]
            if name in self.int8_dtypes:
                self._check_scales(name, shape, dtype, info.shape)
            else:
                check_stored_as(self.path, name, shape, dtype, info.shape)
        try:
            for rank in self.layout.replica(0):
                plan_rank(spec, self.layout, rank, self.provider, self.series)
        except (LayoutError, SeriesError) as e:
            raise CheckpointError(f"{self.path}: field 'layout' does not fit the model: {e}") from None
        if len(self.stored) > self.layout.world_size:
            raise CheckpointError(f"{self.path}: {len(self.stored)} rank files for a layout of "
                                  f"{plural(self.layout.world_size, 'rank')}")

    def _check_scales(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, expected: tuple[int, ...]
                      ) -> None:
        """A tensor the manifest calls int8 weight-only: stored as int8 of the config's shape, with a float scale per
        row, all of them stored."""
        scales = namespaced(SCALES, name)
        if dtype != torch.int8 or shape != expected or scales not in self.tensors or scales not in self.pieces:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {DTYPE_NAMES[dtype]} {list(shape)}: as int8 "
                                  f"weight-only it must be I8 {list(expected)}, with its scales {scales!r} stored")
        check_stored_as(self.path, scales, *self.tensors[scales], expected[:1])

    def int8_names(self, plan: RankPlan) -> set[str]:
        """The rank's tensors this checkpoint stores as int8 weight-only: every box from an int8 HF tensor, and only
        projections (and the LM head) may be; a tensor int8 in part is refused, naming it."""
        if self.int8_head is None:
            return set()
        out, allowed = set(), set(quantized(plan, head=True))
        for name, t in plan.tensors.items():
            int8 = [b.source for b in t.boxes if b.source in self.int8_dtypes]
            if not int8:
                continue
            if name not in allowed:
                raise CheckpointError(f"{self.path}: weight_only.dtypes lists {int8[0]!r} as int8, but it is part of "
                                      f"{name!r}, which int8 weight-only never quantizes")
            if len(int8) != len(t.boxes):
                whole = next(b.source for b in t.boxes if b.source not in self.int8_dtypes)
                raise CheckpointError(f"{self.path}: weight_only.dtypes lists {int8[0]!r} as int8, but {name!r} also "
                                      f"holds {whole!r}, stored in full precision")
            out.add(name)
        return out

    def read_int8(self, t: ShardedTensor, dtype: torch.dtype | None, device: torch.device) -> Int8Weight:
        """An int8 weight-only tensor's values and scales (cast to ``dtype``; None: as stored) from its boxes."""
        q = torch.empty(t.shape, dtype=torch.int8)
        scale = torch.empty(t.shape[0], dtype=self.tensors[namespaced(SCALES, t.boxes[0].source)][1])
        for box in t.boxes:
            self.read(box, q)
            self.read(Box(namespaced(SCALES, box.source), box.start[:1], box.stop[:1], box.offset[:1]), scale)
        return Int8Weight(q.to(device), scale.to(device, dtype or scale.dtype))

    def check_state(self, spec: ModelSpec, namespaces: tuple[str, ...]) -> None:
        """Every namespace stores an fp32 tensor of each model tensor's shape (else this is no training checkpoint)."""
        for namespace in namespaces:
            for name, info in spec.tensors().items():
                stored = namespaced(namespace, name)
                if stored not in self.tensors or stored not in self.pieces:
                    raise CheckpointError(f"{self.path}: tensor {stored!r} is missing: not a training checkpoint "
                                          "saved with its optimizer state")
                shape, dtype = self.tensors[stored]
                if shape != info.shape or dtype != torch.float32:
                    raise CheckpointError(f"{self.path}: tensor {stored!r} is {DTYPE_NAMES[dtype]} {list(shape)}, "
                                          f"expected F32 {list(info.shape)}")

    def read_state(self, plan: RankPlan, namespace: str, tensors: dict[str, torch.Tensor]) -> None:
        """Fill ``tensors`` (held name -> tensor laid out like that weight) from the namespace's stored boxes."""
        done = set()
        for name, tensor in tensors.items():
            if id(tensor) not in done:
                done.add(id(tensor))
                for box in plan.tensors[name].boxes:
                    self.read(dataclasses.replace(box, source=namespaced(namespace, box.source)), tensor)

    def source_dtype(self, name: str):
        return self.tensors[name][1]

    def _file(self, name: str) -> Checkpoint:
        """A rank file, opened (and its pieces checked against its header) on first use."""
        if name not in self._files:
            ckpt = Checkpoint(self.directory, files=[self.directory / name])
            by_tensor: dict[str, list[Box]] = {}
            for piece in self.stored[name]:
                self._check_stored(ckpt, piece)
                by_tensor.setdefault(piece.tensor, []).append(piece.box)
            for tensor, boxes in by_tensor.items():
                _check_disjoint(self.directory / name, tensor, ckpt.entries[tensor].shape, boxes)
            self._files[name] = ckpt
        return self._files[name]

    def _check_stored(self, ckpt: Checkpoint, piece: Piece) -> None:
        """A piece must lie inside its stored tensor, whose dtype must be the HF tensor's."""
        path, box = self.directory / piece.file, piece.box
        entry = ckpt.entries.get(piece.tensor)
        if entry is None:
            raise CheckpointError(f"{path}: tensor {piece.tensor!r} (holding {box.source!r}) is missing")
        dtype = self.tensors[box.source][1]
        if entry.dtype != dtype:
            raise CheckpointError(f"{path}: tensor {piece.tensor!r} has dtype {DTYPE_NAMES[entry.dtype]}, but the "
                                  f"manifest says {box.source!r} is {DTYPE_NAMES[dtype]}")
        end = [o + n for o, n in zip(box.offset, box.shape)]
        if len(entry.shape) != len(end) or any(e > n for e, n in zip(end, entry.shape)):
            raise CheckpointError(f"{path}: tensor {piece.tensor!r} has shape {list(entry.shape)}, too small for "
                                  f"the piece of {box.source!r} placed at {list(box.offset)}..{end}")

    def _parts(self, box: Box) -> Iterator[tuple[Checkpoint, Box]]:
        """Each rank file holding part of the box, with that part as a box of the tensor stored there."""
        for piece in self.pieces[box.source]:
            part = box.intersect(piece.box.start, piece.box.stop)
            if part is None:
                continue
            shift = [o - s for o, s in zip(piece.box.offset, piece.box.start)]
            yield self._file(piece.file), Box(piece.tensor, tuple(a + d for a, d in zip(part.start, shift)),
                                              tuple(b + d for b, d in zip(part.stop, shift)), part.offset)

    def place(self, box: Box) -> tuple[str, int]:
        """Where the box's first stored part lies (``Checkpoint.place``): the order to read in."""
        ckpt, stored = next(self._parts(box))
        return ckpt.place(stored)

    def read(self, box: Box, dst) -> None:
        """Fill ``dst[box.local_index()]`` from every stored piece that overlaps the box."""
        for ckpt, stored in self._parts(box):
            ckpt.read(stored, dst)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stored_dtypes(weights: Weights, state: State | None) -> dict[str, torch.dtype]:
    """Each HF tensor's dtype on disk: the source's, int8 for int8 weight-only ones, or for a training checkpoint
    the fp32 masters'."""
    int8 = _int8_sources(weights)
    return {name: torch.float32 if state else torch.int8 if name in int8 else weights.source_dtypes[name]
            for name in weights.plan.spec.tensors()}


def _int8_sources(weights: Weights) -> dict[str, torch.dtype]:
    """The HF tensors an int8 weight-only model holds as int8 on any rank (from the plans, as the manifest must be),
    each with its scales' dtype. A tied head's int8 copy is not one: the embedding it is made from is stored."""
    if weights.int8_head is None:
        return {}
    scales = next((t.scale.dtype for t in weights.tensors.values() if isinstance(t, Int8Weight)), torch.float32)
    peers = [weights.plan.peer(rank) for rank in weights.plan.layout.replica(0)]  # each replica quantizes alike
    return {box.source: scales for peer in peers for name in quantized(peer, weights.int8_head)
            if name not in peer.alias for box in peer.work[name].boxes}


def _expert_layout(layout: Layout) -> dict:
    """The EP fields of a manifest's layout, written only under EP: a dense model's manifest stays as it was."""
    if layout.ep == 1:
        return {}
    return {"ep": layout.ep} | ({} if layout.expert_placement == "contiguous" else
                                {"expert_placement": layout.expert_placement})


def rank_entry(weights: Weights, owned: list[Box], state: State | None = None) -> dict:
    """This rank's file in a sharded save's manifest: the ``owned`` pieces, of the weights and of each state
    namespace, and an int8 tensor's scales beside them. Each rank finds its own, so the manifest costs no rank the
    world's plans."""
    namespaces, int8 = list(state.tensors if state else []), _int8_sources(weights)
    pieces = [{"tensor": stored_name(box), **dataclasses.replace(box, offset=(0,) * len(box.offset)).to_json()}
              for box in owned]
    pieces += [{**p, "tensor": namespaced(ns, p["tensor"]), "source": namespaced(ns, p["source"])}
               for ns in namespaces for p in pieces]
    pieces += [{"tensor": namespaced(SCALES, stored_name(box)), "source": namespaced(SCALES, box.source),
                "start": [box.start[0]], "stop": [box.stop[0]], "offset": [0]}
               for box in owned if box.source in int8]
    return {"file": rank_file(weights.plan.rank), "rank": weights.plan.rank, "pieces": pieces}


def manifest(weights: Weights, files: list[dict], state: State | None = None) -> dict:
    """The manifest of a sharded save, from every rank's ``rank_entry`` (``files``, in rank order)."""
    spec, layout = weights.plan.spec, weights.plan.layout
    namespaces = list(state.tensors if state else [])
    int8 = _int8_sources(weights)
    dtypes = _stored_dtypes(weights, state)
    tensors = {name: {"shape": list(info.shape), "dtype": DTYPE_NAMES[dtypes[name]]}
               for name, info in spec.tensors().items()}
    tensors |= {namespaced(ns, name): {"shape": list(info.shape), "dtype": "F32"}
                for ns in namespaces for name, info in spec.tensors().items()}
    tensors |= {namespaced(SCALES, name): {"shape": [spec.tensors()[name].shape[0]], "dtype": DTYPE_NAMES[dtype]}
                for name, dtype in int8.items()}
    return {
        "format": FORMAT,
        "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, **_expert_layout(layout),
                   "provider": weights.plan.provider, "series": [str(s) for s in weights.plan.declared]},
        "tensors": tensors,
        "files": files,
        **({"train": state.record} if state else {}),
        **({"weight_only": {"int8_head": weights.int8_head, "dtypes": {
            name: DTYPE_NAMES[weights.source_dtypes[name]] for name in int8}}} if int8 else {}),
    }


def save_sharded(weights: Weights, out_dir: str | Path, overwrite: bool = False, state: State | None = None,
                 sources: list[str | Path] | None = None) -> Path:
    """Collective: each rank writes its own file; rank 0 the manifest; published atomically once all succeeded.

    ``out_dir`` must be new, empty, or (with ``overwrite``) a checkpoint holding nothing else, and none of
    ``sources`` (default: the directory the weights came from). With ``state``, this is a training checkpoint (see
    the module's docstring). config.json names the dtype the files hold.
    """
    rank, dtypes = weights.plan.rank, _stored_dtypes(weights, state)

    def write_rank_file(tmp: Path) -> dict:
        local, owned = {}, weights.plan.owned()
        for name, box in owned:
            key, index, t = stored_name(box), box.local_index(), weights.tensors[name]
            if isinstance(t, Int8Weight):  # as it is: int8 values, and its rows' scales beside them
                local[key], local[namespaced(SCALES, key)] = t.q[index], t.scale[index[0]]
                continue
            local[key] = t[index].to(dtypes[box.source])
            for namespace, tensors in (state.tensors if state else {}).items():
                local[namespaced(namespace, key)] = tensors[name][index]
        save_safetensors(local, tmp / rank_file(rank))
        return rank_entry(weights, [box for _, box in owned], state)

    def finish(tmp: Path, written: dict[str, list[dict]]) -> None:
        (tmp / MANIFEST).write_text(json.dumps(manifest(weights, written["writing data"], state)))
        copy_side_files(weights.source_dir, naming_dtype(weights.plan.spec.config, dtypes.values()), tmp)

    return write_checkpoint(out_dir, [("writing data", write_rank_file)], finish, rank=rank, overwrite=overwrite,
                            sources=weights.sources if sources is None else sources)

