"""The sharded checkpoint: one safetensors file per rank, plus a manifest of boxes.

Saving is each rank writing its own tensors in one sequential file, the fastest a
save can be. The manifest records, for every stored tensor, which box of which HF
tensor it holds. Loading under another layout (any TP, PP or world size) asks for
boxes of HF tensors; each request is intersected with the stored boxes and becomes
reads of just the overlapping bytes of the rank files that hold them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .boxes import Box
from .layout import Layout, plan_rank
from .reader import DTYPE_NAMES, DTYPES, Checkpoint, CheckpointError
from .spec import ModelSpec

if TYPE_CHECKING:
    from .loader import Weights

MANIFEST = "shardwise.json"
FORMAT = "shardwise.sharded/1"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Piece:
    """A stored tensor ``tensor`` in rank file ``file`` holds ``box`` of an HF tensor."""

    file: str
    tensor: str
    box: Box


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


class ShardedCheckpoint:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable shardwise manifest ({e})") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        self.layout = Layout(**manifest["layout"])
        self.tensors = {name: (tuple(t["shape"]), DTYPES[t["dtype"]]) for name, t in manifest["tensors"].items()}
        self.pieces: dict[str, list[Piece]] = {}
        seen = set()
        for f in manifest["files"]:
            for p in f["pieces"]:
                box = Box.from_json(p)
                if box not in seen:  # replicated boxes are stored by several ranks; read one
                    seen.add(box)
                    self.pieces.setdefault(box.source, []).append(Piece(f["file"], p["tensor"], box))
        self._files: dict[str, Checkpoint] = {}

    def check(self, spec: ModelSpec) -> None:
        for name, info in spec.tensors().items():
            if name not in self.tensors or name not in self.pieces:
                raise CheckpointError(f"{self.directory / MANIFEST}: tensor {name!r} is missing")
            if self.tensors[name][0] != info.shape:
                raise CheckpointError(f"{self.directory / MANIFEST}: tensor {name!r} has shape "
                                      f"{list(self.tensors[name][0])}, but config.json implies {list(info.shape)}")

    def source_dtype(self, name: str):
        return self.tensors[name][1]

    def _file(self, name: str) -> Checkpoint:
        if name not in self._files:
            self._files[name] = Checkpoint(self.directory, files=[self.directory / name])
        return self._files[name]

    def read(self, box: Box, dst) -> None:
        """Fill ``dst[box.local_index()]`` from every stored piece that overlaps the box."""
        for piece in self.pieces[box.source]:
            part = box.intersect(piece.box.start, piece.box.stop)
            if part is None:
                continue
            shift = [o - s for o, s in zip(piece.box.offset, piece.box.start)]
            stored = Box(piece.tensor, tuple(a + d for a, d in zip(part.start, shift)),
                         tuple(b + d for b, d in zip(part.stop, shift)), part.offset)
            self._file(piece.file).read(stored, dst)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def manifest(weights: Weights) -> dict:
    """The manifest of a sharded save, computed from plans alone: every rank could write it."""
    spec, layout = weights.plan.spec, weights.plan.layout
    files = []
    for rank in range(layout.world_size):
        plan = plan_rank(spec, layout, rank)
        stored = {}
        for name, t in plan.tensors.items():
            stored.setdefault((t.shape, t.boxes), (name, t))
        pieces = [{"tensor": name, **box.to_json()} for name, t in stored.values() for box in t.boxes]
        files.append({"file": rank_file(rank), "rank": rank, "pieces": pieces})
    return {
        "format": FORMAT,
        "layout": {"tp": layout.tp, "pp": layout.pp},
        "tensors": {name: {"shape": list(info.shape), "dtype": DTYPE_NAMES[weights.source_dtypes[name]]}
                    for name, info in spec.tensors().items()},
        "files": files,
    }


def save_sharded(weights: Weights, out_dir: str | Path) -> Path:
    """Collective: each rank writes its own file; rank 0 the manifest; published atomically once all succeeded."""
    from .writer import collective_directory, save_safetensors

    def finish(tmp: Path) -> None:
        (tmp / MANIFEST).write_text(json.dumps(manifest(weights)))
        copy_side_files(weights, tmp)

    rank = weights.plan.rank
    with collective_directory(out_dir, rank, finish) as tmp:
        local = {name: t.to(weights.source_dtypes[weights.plan.tensors[name].boxes[0].source])
                 for name, t in weights.unique().items()}
        save_safetensors(local, tmp / rank_file(rank))
    return Path(out_dir)


def copy_side_files(weights: Weights, directory: Path) -> None:
    """config.json, and the tokenizer files a user needs to run the checkpoint."""
    (directory / "config.json").write_text(json.dumps(weights.plan.spec.config, indent=2))
    for name in SIDE_FILES:
        if (weights.source_dir / name).exists():
            shutil.copy(weights.source_dir / name, directory / name)

