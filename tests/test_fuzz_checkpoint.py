"""Property-based fuzzing of every checkpoint parser: safetensors headers, index files and sharded manifests.

Each starts from a valid file and mutates it (truncation, bit flips, wrong types, huge
numbers, hostile paths). The property: shardwise either loads exactly the original
weights or raises its own ``CheckpointError``, and never opens a file outside the
checkpoint or reads outside a file.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from fuzzing import FUZZ
from hypothesis import given
from hypothesis import strategies as st
from workers import reshard_all

from shardwise import Box, Checkpoint, CheckpointError, ShardedCheckpoint, launch, load_weights
from shardwise.io.writer import save_safetensors

BOUNDARY_INTS = st.sampled_from([0, 1, -1, 7, 2**31, 2**32, 2**53 + 1, 2**63, 2**64 - 1, 2**64, 10**30])
PATHS = st.sampled_from(["../x.safetensors", "/etc/passwd", "a/../../b", "", ".", "..", "\0", "\\x",
                         "model.safetensors", "rank-00000.safetensors", "/proc/self/mem", "~/.ssh/id_rsa"])
JSON_LEAF = st.one_of(st.none(), st.booleans(), BOUNDARY_INTS, st.integers(), st.floats(allow_nan=False),
                      st.text(max_size=8), PATHS)
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=12)


class Mutate:
    """Structured mutations of a JSON document: replace, delete or wrap one value at a random path."""

    @staticmethod
    def paths(doc, prefix=()) -> list[tuple]:
        out = [prefix]
        if isinstance(doc, dict):
            for k, v in doc.items():
                out += Mutate.paths(v, (*prefix, k))
        elif isinstance(doc, list):
            for i, v in enumerate(doc):
                out += Mutate.paths(v, (*prefix, i))
        return out

    @staticmethod
    def apply(doc, path: tuple, how: str, value):
        if not path:
            return value if how != "wrap" else [doc]
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if how == "delete":
            del parent[key]
        elif how == "wrap":
            parent[key] = [parent[key]]
        elif how == "bump" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] += value if isinstance(value, int) else 1
        else:
            parent[key] = value
        return doc


@st.composite
def mutated(draw, doc: dict, rounds: int = 3):
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, rounds))):
        paths = Mutate.paths(doc)
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["replace", "delete", "wrap", "bump"]))
        if how == "delete" and not path:
            continue
        doc = Mutate.apply(doc, path, how, draw(st.one_of(JSON, BOUNDARY_INTS)))
    return doc


@contextlib.contextmanager
def only_inside(directory: Path):
    """Fail the test if shardwise opens any file outside ``directory`` within the block."""
    real_open, real_os_open = builtins.open, os.open
    root = directory.resolve()

    def check(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            real = Path(os.fsdecode(path)).resolve()
            assert real.is_relative_to(root), f"opened {real} outside {root}"

    def guarded_open(path, *args, **kwargs):
        check(path)
        return real_open(path, *args, **kwargs)

    def guarded_os_open(path, *args, **kwargs):
        check(path)
        return real_os_open(path, *args, **kwargs)

    with mock.patch("shardwise.io.reader.open", guarded_open, create=True), \
            mock.patch.object(os, "open", guarded_os_open):
        yield


def load_or_refuse(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """The fuzz property: the original weights exactly, or a CheckpointError; nothing else, no silent change."""
    try:
        with only_inside(path):
            weights = load_weights(path, progress=False)
    except CheckpointError:
        return
    for name, t in expected.items():
        assert torch.equal(weights.tensors[name], t), f"{name} loaded different values without an error"


# --- safetensors headers -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_safetensors({"a": torch.randn(4, 6, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
                      "c": torch.arange(10, dtype=torch.int32), "d": torch.randn(2, 2, 2, generator=g).half()}, path)
    return path, path.read_bytes()


def read_everything(directory: Path) -> None:
    """Parse the header and read every tensor, whole and by columns: both read paths of the reader."""
    with Checkpoint(directory) as ck:
        for entry in ck.entries.values():
            assert 8 <= entry.begin <= entry.end <= entry.path.stat().st_size, "an entry lies outside its file"
            out = torch.empty(entry.shape, dtype=entry.dtype)
            zeros = (0,) * len(entry.shape)
            ck.read(Box(entry.name, zeros, entry.shape, zeros), out)
            if len(entry.shape) == 2 and entry.shape[1] > 1:
                cols = (entry.shape[0], entry.shape[1] - 1)
                ck.read(Box(entry.name, (0, 1), entry.shape, (0, 0)), torch.empty(cols, dtype=entry.dtype))


def _check_file(directory: Path, data: bytes) -> None:
    (directory / "model.safetensors").write_bytes(data)
    with contextlib.suppress(CheckpointError), only_inside(directory):
        read_everything(directory)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(safetensors_file, tmp_path_factory, data):
    path, raw = safetensors_file
    directory = tmp_path_factory.mktemp("fz", numbered=True)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    kind = data.draw(st.sampled_from(["truncate", "flip", "json", "length"]))
    if kind == "truncate":
        blob = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        i = data.draw(st.integers(0, 8 + n - 1))
        blob = raw[:i] + bytes([raw[i] ^ (1 << data.draw(st.integers(0, 7)))]) + raw[i + 1 :]
    elif kind == "length":
        blob = data.draw(BOUNDARY_INTS.filter(lambda v: 0 <= v < 2**64)).to_bytes(8, "little") + raw[8:]
    else:
        body = json.dumps(data.draw(mutated(header))).encode()
        body += b" " * (-len(body) % 8)
        blob = len(body).to_bytes(8, "little") + body + raw[8 + n :]
    _check_file(directory, blob)
    shutil.rmtree(directory)


# --- index files -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def indexed(checkpoints) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    return original(checkpoints["llama-untied"], checkpoints["llama-untied"], "model.safetensors.index.json")


def original(hf: Path, src: Path, name: str) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """A checkpoint to damage, the JSON document to mutate, and the weights it must load as (from HF's copy)."""
    return src, json.loads((src / name).read_text()), load_weights(hf, progress=False).tensors


@FUZZ
@given(data=st.data())
def test_fuzz_index(indexed, tmp_path_factory, data):
    src, index, expected = indexed
    with scratch_copy(src, tmp_path_factory, "model.safetensors.index.json") as directory:
        (directory / "model.safetensors.index.json").write_text(json.dumps(data.draw(mutated(index))))
        load_or_refuse(directory, expected)


@contextlib.contextmanager
def scratch_copy(src: Path, tmp_path_factory, damaged: str):
    """A copy of a checkpoint for one example to damage, removed afterwards (hypothesis runs hundreds). Only the
    file ``damaged`` is left out, for the example to write; the others, which nothing writes, are hard links (much
    cheaper than copies, and inside the directory all the same)."""
    directory = tmp_path_factory.mktemp("fz", numbered=True)
    for p in src.iterdir():
        if p.name != damaged:
            try:
                os.link(p, directory / p.name)
            except OSError:  # another file system
                shutil.copy(p, directory / p.name)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


# --- sharded manifests -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifested(checkpoints, tmp_path_factory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("man") / "s"
    launch(reshard_all, 2, {"q": str(checkpoints["qwen2-untied"])}, {"q": str(out)}, 2, 1, timeout=300)
    return original(checkpoints["qwen2-untied"], out, "shardwise.json")


@FUZZ
@given(data=st.data())
def test_fuzz_manifest(manifested, tmp_path_factory, data):
    src, manifest, expected = manifested
    with scratch_copy(src, tmp_path_factory, "shardwise.json") as directory:
        if data.draw(st.booleans()):
            (directory / "shardwise.json").write_text(json.dumps(data.draw(mutated(manifest))))
        else:
            raw = (src / "shardwise.json").read_bytes()
            (directory / "shardwise.json").write_bytes(raw[: data.draw(st.integers(1, len(raw) - 1))])
        try:
            same = _geometry(ShardedCheckpoint(directory)) == _geometry(ShardedCheckpoint(src))
        except CheckpointError:
            same = False
        if same:  # the mutation kept what is stored where: the load must be exact
            load_or_refuse(directory, expected)
        else:  # a manifest that moved pieces around may load other values, but only ever through validated reads
            with contextlib.suppress(CheckpointError), only_inside(directory):
                load_weights(directory, progress=False)


def _geometry(ck: ShardedCheckpoint) -> tuple:
    return ck.tensors, sorted((p.file, p.tensor, p.box.to_json().__repr__()) for ps in ck.stored.values() for p in ps)
