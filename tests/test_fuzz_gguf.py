"""Property-based tests of the GGUF reader and importer: every byte of a GGUF is hostile.

Each example damages one valid tiny GGUF and checks the contract: ``read_gguf`` (and
``import_gguf``, when the damaged file still parses) succeeds or raises GGUFError, never
anything else and never slowly; and a file that parses has every tensor's span inside
the file, holding exactly the bytes there.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fuzzing import FUZZ
from hypothesis import event, given
from hypothesis import strategies as st

from shardwise.io.gguf.file import GGUFError, GGUFFile, read_gguf
from shardwise.io.gguf.importer import import_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package (the `hf` extra) is not installed")
Q, V = gguf.GGMLQuantizationType, gguf.GGUFValueType

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 2, 1, 16
TOKENS = ["<s>", "</s>", "a", "b", "ab", "c", "abc", "d"]
METADATA: dict[str, tuple[object, V]] = {
    "general.architecture": ("llama", V.STRING),
    "general.alignment": (32, V.UINT32),
    "llama.block_count": (1, V.UINT32),
    "llama.context_length": (64, V.UINT32),
    "llama.embedding_length": (HIDDEN, V.UINT32),
    "llama.feed_forward_length": (HIDDEN, V.UINT32),
    "llama.attention.head_count": (HEADS, V.UINT32),
    "llama.attention.head_count_kv": (KV_HEADS, V.UINT32),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
    "llama.rope.freq_base": (10000.0, V.FLOAT32),
    "tokenizer.ggml.model": ("gpt2", V.STRING),
    "tokenizer.ggml.tokens": (TOKENS, V.ARRAY),
    "tokenizer.ggml.token_type": ([3, 3] + [1] * (len(TOKENS) - 2), V.ARRAY),
    "tokenizer.ggml.merges": (["a b", "ab c"], V.ARRAY),
    "tokenizer.ggml.pre": ("gpt-2", V.STRING),
    "tokenizer.ggml.bos_token_id": (0, V.UINT32),
    "tokenizer.ggml.eos_token_id": (1, V.UINT32),
    "tokenizer.chat_template": ("{{ messages }}", V.STRING),
    # One key of each remaining value type, and nested arrays, for the fuzzer to damage.
    **{f"fuzz.{t.name.lower()}": (1, t) for t in (V.UINT8, V.INT8, V.UINT16, V.INT16, V.INT32, V.UINT64, V.INT64)},
    "fuzz.float64": (0.5, V.FLOAT64),
    "fuzz.bool": (True, V.BOOL),
    "fuzz.nested": ([[1, 2], [3]], V.ARRAY),
}
# Keys the importer reads that the tiny file leaves out: the rewriting fuzzer may add them.
OPTIONAL_KEYS = ["llama.attention.key_length", "llama.rope.dimension_count", "llama.rope.scaling.type",
                 "llama.rope.scaling.factor", "llama.vocab_size", "tokenizer.ggml.padding_token_id",
                 "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"]
BOUNDARIES = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 33, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1]
PATH_LIKE = st.sampled_from(["../../etc/passwd", "/etc/passwd", "a/../../b", "..", ".", "C:\\x", "x\x00y", "",
                             "blk.0/../x"])
NOT_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"ok\x80"])
STRANGE_STRINGS = st.one_of(PATH_LIKE, NOT_UTF8, st.binary(max_size=80), st.text(max_size=80))


def tiny_tensors() -> dict[str, tuple[np.ndarray, Q | None]]:
    """A one-layer tied llama in a mix of ggml types, quantized once: name -> (array to write, raw ggml type)."""
    from gguf import quants

    rng = np.random.default_rng(0)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"token_embd.weight": ((len(TOKENS), HIDDEN), Q.Q8_0), "output_norm.weight": ((HIDDEN,), Q.F32),
              "blk.0.attn_norm.weight": ((HIDDEN,), Q.F32), "blk.0.ffn_norm.weight": ((HIDDEN,), Q.F32),
              "blk.0.attn_q.weight": ((q, HIDDEN), Q.Q4_0), "blk.0.attn_k.weight": ((kv, HIDDEN), Q.F16),
              "blk.0.attn_v.weight": ((kv, HIDDEN), Q.BF16), "blk.0.attn_output.weight": ((HIDDEN, q), Q.Q4_1),
              "blk.0.ffn_gate.weight": ((HIDDEN, HIDDEN), Q.Q5_0), "blk.0.ffn_up.weight": ((HIDDEN, HIDDEN), Q.F32),
              "blk.0.ffn_down.weight": ((HIDDEN, HIDDEN), Q.Q8_0)}
    out: dict[str, tuple[np.ndarray, Q | None]] = {}
    for name, (shape, kind) in shapes.items():
        data = rng.standard_normal(shape).astype(np.float32) * 0.1
        out[name] = {Q.F32: (data, None), Q.F16: (data.astype(np.float16), None)}.get(
            kind, (quants.quantize(data, kind), kind))
    return out


TENSORS = tiny_tensors()


def write_gguf(path: Path, metadata: dict[str, tuple[object, V]], tensors: dict[str, tuple[np.ndarray, Q | None]]):
    w = gguf.GGUFWriter(str(path), "llama")
    w.kv_data[0].clear()  # every key, the architecture included, comes from ``metadata``
    for key, (value, vtype) in metadata.items():
        w.add_key_value(key, value, vtype)
    for name, (data, kind) in tensors.items():
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@dataclass(frozen=True)
class Layout:
    """Where the valid tiny file keeps things, found by the gguf package's own reader (an independent oracle)."""

    raw: bytes
    numbers: list[tuple[int, int]]  # (offset, width) of every count, length, type, dim, offset and value
    strings: list[tuple[int, int]]  # (offset of the u64 length, byte length) of every string
    header_end: int
    data_start: int


def layout_of(path: Path) -> Layout:
    reader = gguf.GGUFReader(path)
    numbers, strings, header_end = [], [], 0
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        for before, part in zip([None, *field.parts], field.parts):
            at = part.ctypes.data - reader.data.ctypes.data
            if part.dtype == np.uint8 and before is not None and before.dtype == np.uint64:
                strings.append((at - 8, part.size))
            else:
                numbers += [(at + i * part.itemsize, part.itemsize) for i in range(part.size)]
            header_end = max(header_end, at + part.nbytes)
    return Layout(path.read_bytes(), numbers, strings, header_end, int(reader.data_offset))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Layout:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, METADATA, TENSORS)
    return layout_of(path)


@st.composite
def damaged(draw, lay: Layout) -> bytes:
    """The tiny file truncated, with bits flipped, with numbers overwritten by boundary values, or with a string
    replaced (the header re-padded so the tensor data stays where the offsets say)."""
    raw = bytearray(lay.raw)
    kind = draw(st.sampled_from(["truncate", "flip", "number", "string"]))
    if kind == "truncate":
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, lay.data_start - 1), min_size=1, max_size=4)):
            raw[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    if kind == "number":
        for at, width in draw(st.lists(st.sampled_from(lay.numbers), min_size=1, max_size=3)):
            value = draw(st.one_of(st.sampled_from(BOUNDARIES), st.integers(0, 2**64 - 1)))
            raw[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        return bytes(raw)
    at, size = draw(st.sampled_from(lay.strings))
    new = draw(STRANGE_STRINGS)
    new = new.encode() if isinstance(new, str) else new
    header = raw[:at] + len(new).to_bytes(8, "little") + new + raw[at + 8 + size : lay.header_end]
    return bytes(header + bytes(-len(header) % 32) + raw[lay.data_start :])


def assert_spans_inside(gf: GGUFFile, raw: bytes) -> None:
    """Every tensor is a read-only view of exactly its bytes, inside the file, of the size its type and shape need."""
    for t in gf.tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[t.type]
        assert t.data.nbytes == t.shape[-1] // block * type_size * math.prod(t.shape[:-1])
        assert t.offset >= 0 and t.offset + t.data.nbytes <= len(raw)
        assert not t.data.flags.writeable
        assert t.data.tobytes() == raw[t.offset : t.offset + t.data.nbytes]


def assert_plain(value: object) -> None:
    assert type(value) in (int, float, bool, str, list), type(value)
    if type(value) is list:
        for item in value:
            assert_plain(item)


def import_or_gguf_error(src: Path, out: Path) -> None:
    """Import succeeds, or fails with GGUFError leaving nothing behind (which one is shown by
    --hypothesis-show-statistics)."""
    try:
        import_gguf(src, out, dtype="float32")
    except GGUFError:
        assert not out.exists()
        event("import_gguf refused it")
        return
    event("imported")
    shutil.rmtree(out)


def test_tiny_file_reads_as_the_gguf_package_reads_it_and_imports(tiny, tmp_path):
    src = tmp_path / "tiny.gguf"
    src.write_bytes(tiny.raw)
    gf, reader = read_gguf(src), gguf.GGUFReader(src)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert theirs | {"fuzz.nested": [[1, 2], [3]]} == gf.metadata  # GGUFReader flattens nested arrays
    assert [(t.name, t.tensor_type, tuple(reversed(t.shape.tolist())), t.data.tobytes()) for t in reader.tensors] == [
        (t.name, t.type, t.shape, t.data.tobytes()) for t in gf.tensors]
    assert_spans_inside(gf, tiny.raw)
    assert (import_gguf(src, tmp_path / "hf", dtype="float32") / "model.safetensors").exists()


@FUZZ
@given(data=st.data())
def test_damaged_file_reads_and_imports_or_raises_gguf_error(tiny, tmp_path, data):
    raw = data.draw(damaged(tiny))
    src = tmp_path / "damaged.gguf"
    src.write_bytes(raw)
    try:
        gf = read_gguf(src)
    except GGUFError:
        event("read_gguf refused it")
        return
    assert_spans_inside(gf, raw)
    assert_plain(list(gf.metadata.values()))
    import_or_gguf_error(src, tmp_path / "hf")


SMALL = [-1, 0, 1, 2, 7, 8, 9, 16, 32, 64]  # token ids and sizes around the tiny model's
INT_RANGES = {V.UINT8: (0, 2**8 - 1), V.INT8: (-(2**7), 2**7 - 1), V.UINT16: (0, 2**16 - 1),
              V.INT16: (-(2**15), 2**15 - 1), V.UINT32: (0, 2**32 - 1), V.INT32: (-(2**31), 2**31 - 1),
              V.UINT64: (0, 2**64 - 1), V.INT64: (-(2**63), 2**63 - 1)}
# Any GGUF value: integers of every width (small ones likely), NaN and inf, strange strings, (nested) arrays.
TYPED_VALUES = st.one_of(
    *(st.tuples(st.one_of(st.sampled_from([v for v in SMALL if lo <= v]), st.integers(lo, hi)), st.just(t))
      for t, (lo, hi) in INT_RANGES.items()),
    st.tuples(st.floats(width=32), st.just(V.FLOAT32)),
    st.tuples(st.floats(), st.just(V.FLOAT64)),
    st.tuples(st.booleans(), st.just(V.BOOL)),
    st.tuples(st.one_of(st.sampled_from(["gpt2", "gpt-2", "llama", "linear", "none", "yarn"]), PATH_LIKE,
                        st.text(max_size=20)), st.just(V.STRING)),
    st.tuples(st.lists(st.sampled_from(SMALL), min_size=1, max_size=9), st.just(V.ARRAY)),
    st.tuples(st.lists(st.sampled_from([*TOKENS, "a c", "x", "../x"]), min_size=1, max_size=9), st.just(V.ARRAY)),
    st.tuples(st.lists(st.lists(st.sampled_from(SMALL), min_size=1, max_size=2), min_size=1, max_size=2),
              st.just(V.ARRAY)),
)


@st.composite
def rewritten(draw) -> tuple[dict, dict]:
    """The tiny file's metadata and tensors with a few keys removed or given other (typed) values, and maybe one
    tensor dropped, renamed or reshaped: files that parse, so the import's own checks are what is tested."""
    metadata, tensors = dict(METADATA), dict(TENSORS)
    for key in draw(st.lists(st.sampled_from([*METADATA, *OPTIONAL_KEYS]), min_size=1, max_size=3, unique=True)):
        value = draw(st.one_of(st.none(), TYPED_VALUES))
        metadata.pop(key, None)
        if value is not None:
            metadata[key] = value
    name = draw(st.sampled_from(list(TENSORS)))
    edit = draw(st.sampled_from(["none", "drop", "rename", "reshape"]))
    if edit != "none":
        data, kind = tensors.pop(name)
    if edit == "rename":
        new = draw(st.one_of(st.sampled_from(["blk.1.attn_q.weight", "output.weight", "../x", "blk.0.x"]),
                             st.text(max_size=20)))
        tensors.setdefault(new, (data, kind))
    elif edit == "reshape":
        tensors[name] = (data[:-1] if data.ndim > 1 and data.shape[0] > 1 else np.concatenate([data, data]), kind)
    return metadata, tensors


@FUZZ
@given(rewrite=rewritten())
def test_rewritten_metadata_imports_or_raises_gguf_error(tmp_path, rewrite):
    src = tmp_path / "rewritten.gguf"
    write_gguf(src, *rewrite)
    import_or_gguf_error(src, tmp_path / "hf")
