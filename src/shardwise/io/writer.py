"""Writing safetensors files: headers planned up front, so every rank can place its bytes without talking."""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .reader import DTYPE_NAMES, byte_view


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


SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    call = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if call is not None:
        call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a just-written byte range to the disk now (Linux's ``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``), not when the closing fsync asks for every byte at once: the disk then works while
    the rest is still being copied into the page cache (an HF export from TP 2 of 697 MB: 0.73-0.81 s against
    0.87-0.97 s). It makes nothing durable by itself, so the fsync stays; elsewhere it does nothing."""
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # only a hint: an error leaves the work to the fsync


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
        f.flush()
        os.fsync(f.fileno())  # durable before the checkpoint that holds it is published
