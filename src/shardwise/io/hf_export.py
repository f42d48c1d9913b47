"""Export any layout back to an HF checkpoint, every rank writing its own bytes in parallel.

Nothing here knows about TP, PP or fused tensors. The files, their headers and every
tensor's offset follow from the spec alone, so each rank computes the same ones and no
rank ever holds a full tensor. Each rank then writes back its boxes, the inverse of
loading: row runs with ``pwrite``, column slices through a shared mmap. A box held
by several ranks (replicated norms, KV heads, a tied embedding on two stages) is
written once, by the lowest of them. Once all have written, every rank reads its bytes
back to verify them while the files are synced, before the directory is published.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.forward import Model
from ..model.weight_only import Int8Weight
from ..plan.boxes import Box
from ..plan.spec import ModelSpec, naming_dtype
from ..progress import progress_bar
from ..providers.weights import Weights
from .collective_write import write_checkpoint
from .publish import copy_side_files, fsync_path
from .reader import INDEX_FILE, Checkpoint, Entry, is_row_run, mapped_box
from .writer import Placement, plan_file, start_writeback, tensor_bytes

DEFAULT_FILE_BYTES = 5 * 2**30


@dataclass(frozen=True)
class OutFile:
    name: str
    head: bytes
    places: dict[str, Placement]

    @property
    def size(self) -> int:
        return len(self.head) + sum(p.nbytes for p in self.places.values())


def file_plan(spec: ModelSpec, dtypes: dict[str, torch.dtype], max_file_bytes: int) -> list[OutFile]:
    """HF tensors in spec order, cut into files of at most ``max_file_bytes`` (a bigger tensor gets its own)."""
    groups: list[list] = [[]]
    size = 0
    for name, info in spec.tensors().items():
        n = math.prod(info.shape) * dtypes[name].itemsize
        if groups[-1] and size + n > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, dtypes[name], info.shape))
        size += n
    out = []
    for i, group in enumerate(groups):
        head, places = plan_file(group)
        out.append(OutFile(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", head, {p.name: p for p in places}))
    return out


def owned_boxes(weights: Weights) -> list[tuple[torch.Tensor | Int8Weight, Box]]:
    """This rank's (tensor, box) pairs that it alone writes (``RankPlan.owned``): every byte is written once. An int8
    weight-only tensor is dequantized box by box as it is written (``Int8Weight.__getitem__``)."""
    return [(weights.tensors[name], box) for name, box in weights.plan.owned()]


def header_digest(files: list[OutFile]) -> str:
    """All ranks must derive byte-identical headers, or they would overwrite each other's data."""
    return hashlib.sha256(b"".join(f.head for f in files)).hexdigest()


def _write_box(path: Path, fd: int, place: Placement, box: Box, data: torch.Tensor) -> None:
    """Write a box's bytes into its place in the file, then have the kernel start writing its rows' span to disk."""
    row = math.prod(place.shape[1:]) * place.dtype.itemsize
    if is_row_run(box, place.shape):
        buf, offset = memoryview(tensor_bytes(data)), place.offset + box.start[0] * row
        while buf:
            n = os.pwrite(fd, buf, offset)
            buf, offset = buf[n:], offset + n
    else:
        entry = Entry(path, place.name, place.dtype, place.shape, place.offset, place.offset + place.nbytes)
        with mapped_box(entry, box, write=True) as view:
            view.copy_(data)
    start_writeback(fd, place.offset + box.start[0] * row, (box.stop[0] - box.start[0]) * row)


def _verify(tmp: Path, files: list[OutFile], mine: list[tuple[torch.Tensor, Box]],
            dtypes: dict[str, torch.dtype]) -> None:
    with Checkpoint(tmp, files=[tmp / f.name for f in files]) as ckpt:
        for tensor, box in mine:
            back = torch.empty(box.shape, dtype=dtypes[box.source])
            ckpt.read(Box(box.source, box.start, box.stop, (0,) * len(box.shape)), back)
            written = tensor[box.local_index()].to(back.dtype).cpu()
            if not torch.equal(raw_bytes(back), raw_bytes(written)):  # bytes, so NaNs compare equal too
                raise OSError(f"{tmp}: tensor {box.source!r} rows {box.start}..{box.stop} read back differently")


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as the widest integers that fit: comparing int64 words is ~6x faster than bytes."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    word = next(w for w in (torch.int64, torch.int32, torch.int16, torch.uint8) if flat.numel() % w.itemsize == 0)
    if flat.storage_offset() % word.itemsize:  # a view into a flat buffer (a ZeRO-3 piece) may sit unaligned
        flat = flat.clone()
    return flat.view(word)


def export(source: Model | Weights, out_dir: str | Path, max_file_bytes: int = DEFAULT_FILE_BYTES,
           progress: bool = True, overwrite: bool = False) -> Path:
    """Write an HF checkpoint (original names, the weights' source dtypes, config, index) from any layout; collective.

    config.json names the dtype the files hold.

    ``out_dir`` must be new, empty, or (with ``overwrite``) a checkpoint holding nothing else.
    """
    weights = source.weights if isinstance(source, Model) else source
    if weights is None:
        raise ValueError(f"rank {source.comm.rank}: cannot export a closed model; export before close()")
    spec, rank, dtypes = weights.plan.spec, weights.plan.rank, weights.source_dtypes
    files = file_plan(spec, dtypes, max_file_bytes)
    mine = owned_boxes(weights)
    digest = header_digest(files)

    def write_headers(tmp: Path) -> None:
        if rank == 0:
            for f in files:
                with open(tmp / f.name, "wb") as fh:
                    fh.write(f.head)
                    fh.truncate(f.size)

    def write_data(tmp: Path) -> None:
        where = {name: (tmp / f.name, place) for f in files for name, place in f.places.items()}
        fds = {path: os.open(path, os.O_WRONLY) for path, _ in where.values()}
        try:
            for tensor, box in progress_bar(mine, progress and rank == 0, desc="exporting", unit="box"):
                path, place = where[box.source]
                _write_box(path, fds[path], place, box, tensor[box.local_index()].to(place.dtype).cpu())
        finally:
            for fd in fds.values():
                os.close(fd)

    def sync_and_verify(tmp: Path) -> None:
        """Every rank makes the files durable (rank 0 may be on another host) while it reads its boxes back: the
        read-back is served from the page cache and the fsync waits on the disk, so the two overlap. Once every
        rank has written, no byte changes any more, so what is read back is what is synced."""
        with ThreadPoolExecutor(1) as pool:
            synced = pool.submit(lambda: [fsync_path(tmp / f.name) for f in files])
            _verify(tmp, files, mine, dtypes)
            synced.result()

    def finish(tmp: Path, _written: dict) -> None:
        weight_map = {name: f.name for f in files for name in f.places}
        total = sum(p.nbytes for f in files for p in f.places.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        copy_side_files(weights.source_dir, naming_dtype(spec.config, dtypes.values()), tmp)

    steps = [("writing headers", write_headers), ("writing data", write_data),
             ("syncing and verifying", sync_and_verify)]
    return write_checkpoint(out_dir, steps, finish, rank=rank, overwrite=overwrite, sources=weights.sources,
                            agreed=digest)
