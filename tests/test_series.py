"""Layer-sharded weight series: the same numbers as resident weights, each series layer held and read by its one
DP owner plus k+1 windows as the plan predicts, a ring that broadcasts every layer once per forward k layers
ahead, declarations refused before any byte is read, and exports and sharded saves that need nothing new.

A series spreads layers over the DP group, so every check of a loaded model needs
spawned ranks: one launch per world size (2: dp=2; 3: dp=3; 4: tp=2 x dp=2 and
pp=2 x dp=2) runs every job of that size. Checking declarations needs no rank at all:
``plan_rank`` is pure.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import series_workers as sw
import torch
from conftest import PROMPT, STEPS, write_checkpoint
from safetensors import safe_open
from shared_launch import Failed, run_jobs

from shardwise import Layout, launch, load_model, load_spec, load_weights, plan_rank
from shardwise.bench.load import source_bytes
from shardwise.cli import main
from shardwise.cli.plan import plan_table
from shardwise.io.loader import Provide
from shardwise.io.reader import Checkpoint
from shardwise.plan.boxes import split_evenly
from shardwise.plan.series import Series, SeriesError
from shardwise.providers.series import series_memory

Mesh = tuple[int, int, int]  # (tp, pp, dp)
LAYERS = 5  # deeper than conftest's 3, so k=2 fits; 5 is uneven over dp=2 and dp=3
# 9 heads / 3 KV heads, bf16, tied; qkv biases, fp32, untied in many files; Phi-3's packed projections; OLMo-2
DEEP = ("llama-tied", "qwen2-untied", "phi3-untied", "olmo2-tied")
PAGE = sw.zw.PAGE
TIMEOUT = 180  # a rank stuck in a broadcast (a lockstep bug) fails the launch after this


@dataclass(frozen=True)
class Case:
    """A series to load: the layout, the checkpoint, the declarations, the dtype the ranks compute in, and whether
    broadcasts go through shared memory (else gloo)."""

    mesh: Mesh
    name: str
    declared: tuple[str, ...]
    dtype: torch.dtype = torch.float32
    shm: bool = True

    def __str__(self) -> str:
        dtype = "" if self.dtype == torch.float32 else f"-{str(self.dtype).removeprefix('torch.')}"
        return f"{label(self.mesh)}-{self.name}-{'+'.join(self.declared)}{dtype}{'' if self.shm else '-gloo'}"

    @property
    def layout(self) -> Layout:
        return Layout(*self.mesh)


PLANNED = Case((1, 1, 2), "llama-tied", ("*.o,k=1", "*.down,k=2"), shm=False)  # what the plan test prints
CASES = [  # each compared with resident weights on the same layout
    Case((1, 1, 2), "llama-tied", ("*.o,k=0",)),
    PLANNED,
    Case((1, 1, 2), "llama-tied", ("*.o,k=2", "*.down,k=1"), torch.bfloat16),  # 2-byte windows
    Case((1, 1, 2), "qwen2-untied", ("*.o,k=2", "*.down,k=0")),
    Case((1, 1, 2), "qwen2-untied", ("*.down,k=1,layers=1:5",)),  # a series over part of the layers
    Case((1, 1, 2), "qwen2-untied", ("*.o,k=1", "*.down,k=2"), shm=False),
    Case((1, 1, 2), "qwen2-untied", ("*.o,k=3",)),  # the largest k: n - 1 windows
    Case((1, 1, 3), "llama-tied", ("*.o,k=2", "*.down,k=0")),
    Case((1, 1, 3), "qwen2-untied", ("*.o,k=1", "*.down,k=2")),
    Case((1, 1, 3), "qwen2-untied", ("*.o,k=3", "*.down,k=1"), torch.bfloat16),  # fp32 stored, bf16 windows
    Case((1, 1, 3), "llama-tied", ("*.o,k=0,layers=3:5", "*.down,k=1,layers=0:3")),  # DP rank 2 owns no o layer
    Case((2, 1, 2), "llama-tied", ("*.o,k=1", "*.down,k=2")),
    Case((2, 1, 2), "qwen2-untied", ("*.o,k=2", "*.down,k=0")),
    Case((2, 1, 2), "qwen2-untied", ("*.o,k=1", "*.down,k=2"), shm=False),
    Case((2, 1, 2), "phi3-untied", ("*.qkv,k=1", "*.gate_up,k=0")),  # series of boxes cut from packed tensors
    Case((2, 1, 2), "olmo2-tied", ("*.qkv,k=0", "*.k_norm,k=1")),  # k_norm: KV head widths, split over TP
    Case((1, 2, 2), "llama-tied", ("*.o,k=1,layers=0:3",)),  # stage 1 has no series at all
    Case((1, 2, 2), "qwen2-untied", ("*.o,k=0", "*.down,k=0")),  # each stage its own series, 3 and 2 layers
]
RINGS = [  # broadcasting (gloo): on one host the layers are shared in place, with no ring
    Case((1, 1, 2), "qwen2-untied", ("*.o,k=2", "*.down,k=1,layers=1:5"), shm=False),  # position 3 -> 0 wraps
    Case((1, 1, 3), "llama-tied", ("*.o,k=3", "*.down,k=0"), shm=False),
    Case((1, 2, 2), "llama-tied", ("*.o,k=1,layers=0:3", "*.down,k=0"), shm=False),  # stage 1: only down
]
MISUSE_DECLARED = ("*.o,k=0", "*.down,k=1")  # one window for o: gathering a second layer ahead finds none free
UPDATED = ("llama-tied", ("*.o,k=1", "*.down,k=0"), "layers.1")  # layer 1: stored by DP rank 1 alone
ROUND_TRIPS: list[tuple[Mesh, str, tuple[str, ...], Mesh]] = [  # HF -> series -> sharded -> the last layout -> HF
    ((1, 1, 2), "llama-tied", ("*.o,k=1", "*.down,k=2"), (2, 1, 1)),
    ((1, 1, 2), "qwen2-untied", ("*.o,k=0", "*.down,k=1"), (2, 1, 1)),
    ((1, 1, 3), "qwen2-untied", ("*.o,k=2", "*.down,k=0"), (3, 1, 1)),
    ((2, 1, 2), "llama-tied", ("*.o,k=1", "*.down,k=1"), (2, 2, 1)),
]


def size(mesh: Mesh) -> int:
    return mesh[0] * mesh[1] * mesh[2]


def parse(declared: tuple[str, ...]) -> tuple[Series, ...]:
    return tuple(Series.parse(text) for text in declared)


def label(mesh: Mesh) -> str:
    return "x".join(map(str, mesh))


class Worlds:
    """The jobs of each world size, launched once and cached: ``result(world, *key)`` is every rank's value."""

    def __init__(self, paths: dict[str, Path], root: Path):
        self.paths = {name: str(p) for name, p in paths.items()}
        self.root = root
        self.results: dict[tuple, list[Any]] = {}
        self.failed: dict[int, BaseException] = {}
        self.launched: set[int] = set()

    def dirs(self, mesh: Mesh, name: str) -> dict[str, str]:
        return {kind: str(self.root / f"{kind}-{label(mesh)}-{name}") for kind in ("direct", "sharded", "resharded")}

    def jobs(self, world: int) -> dict[tuple, sw.Job]:
        jobs: dict[tuple, sw.Job] = {}
        for case in CASES:
            if size(case.mesh) == world:
                jobs["compare", case] = (sw.compare, (self.paths[case.name], case.layout, case.declared, PROMPT,
                                                      STEPS, case.dtype, case.shm))
        for case in RINGS:
            if size(case.mesh) == world:
                jobs["ring", case] = (sw.ring, (self.paths[case.name], case.layout, case.declared, PROMPT, case.shm))
        for mesh, name, declared, other in ROUND_TRIPS:
            if size(mesh) == world:
                args = (self.paths[name], Layout(*mesh), declared, self.dirs(mesh, name), Layout(*other), PROMPT)
                jobs["round trip", mesh, name] = (sw.round_trip, args)
        if world == 2:
            name, declared, block = UPDATED
            for shm in (False, True):
                jobs["misuse", shm] = (sw.misuses, (self.paths["qwen2-untied"], Layout(dp=2), MISUSE_DECLARED, shm))
                jobs["update", shm] = (sw.update, (self.paths[name], Layout(dp=2), declared, PROMPT, block, shm))
            jobs["eos",] = (sw.eos_lockstep, (self.paths, PROMPT, STEPS, ("*.o,k=1", "*.down,k=2")))  # last: may hang
        return jobs

    def result(self, world: int, *key) -> list[Any]:
        if world in self.failed:  # once: a rerun would find its own half-written outputs in the way
            raise RuntimeError(f"the {world}-rank launch failed") from self.failed[world]
        if world not in self.launched:
            jobs = self.jobs(world)
            try:
                values = launch(run_jobs, world, list(jobs.values()), timeout=TIMEOUT)
            except Exception as e:
                self.failed[world] = e
                raise
            self.results |= dict(zip(jobs, values))
            self.launched.add(world)
        values = self.results[key]
        failures = [f"rank {rank}:\n{v.error}" for rank, v in enumerate(values) if isinstance(v, Failed)]
        if failures:
            pytest.fail(f"job {key} raised:\n" + "\n".join(failures), pytrace=False)
        return values

    def compare(self, case: Case) -> list[dict[str, Any]]:
        return self.result(size(case.mesh), "compare", case)


@pytest.fixture(scope="session")
def deep(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of 5 layers, written by HF as conftest's: room for k=2, and layers that no dp here divides."""
    root = tmp_path_factory.mktemp("deep")
    return {name: write_checkpoint(name, root, layers=LAYERS) for name in DEEP}


@pytest.fixture(scope="module")
def worlds(deep, tmp_path_factory) -> Worlds:
    return Worlds(deep, tmp_path_factory.mktemp("series"))


# What the tests expect, derived from the layout alone.


def coords(mesh: Mesh, rank: int) -> tuple[int, int, int]:
    """(stage, DP rank, TP rank) of a rank: TP innermost, then DP, then PP."""
    tp, _, dp = mesh
    return rank // (tp * dp), rank // tp % dp, rank % tp


def stage_series(mesh: Mesh, declared: tuple[str, ...], rank: int) -> list[tuple[Series, list[str]]]:
    """Each declared series' tensors on the rank's stage, in layer order; position j is stored by DP rank j % dp.
    A series with no layer on the stage is left out."""
    lo, hi = split_evenly(LAYERS, mesh[1])[coords(mesh, rank)[0]]
    out = []
    for s in parse(declared):
        first, last = s.layers or (0, LAYERS)
        names = [f"layers.{n}.{s.pattern.removeprefix('*.')}" for n in range(max(lo, first), min(hi, last))]
        if names:
            out.append((s, names))
    return out


def owned(names: list[str], dp: int, dp_rank: int) -> list[str]:
    return [name for j, name in enumerate(names) if j % dp == dp_rank]


def elsewhere(mesh: Mesh, declared: tuple[str, ...], rank: int) -> set[str]:
    """The series tensors of the rank's stage that other DP ranks store."""
    dp_rank = coords(mesh, rank)[1]
    out: set[str] = set()
    for _, names in stage_series(mesh, declared, rank):
        out |= set(names) - set(owned(names, mesh[2], dp_rank))
    return out


# 1. The same output.


@pytest.mark.parametrize("case", CASES, ids=str)
def test_series_equals_resident_bit_for_bit(worlds, case):
    """Logits and 16 greedy tokens under a series equal, bit for bit, those of resident weights under the same
    layout, on every rank, each DP replica on its own ids."""
    results = worlds.compare(case)
    assert len(results) == size(case.mesh)
    bad = []
    for rank, out in enumerate(results):
        (la, ta), (lb, tb) = out["series"], out["resident"]
        if not torch.equal(la, lb):
            bad.append(f"rank {rank}: logits differ by up to {(la.float() - lb.float()).abs().max().item():.3g}")
        if not torch.equal(ta, tb):
            bad.append(f"rank {rank}: greedy tokens differ")
        assert la.dtype == case.dtype and ta.shape[1] == PROMPT.shape[1] + STEPS
    assert not bad, bad


@pytest.mark.parametrize("case", CASES, ids=str)
def test_replicas_fed_different_ids(worlds, case):
    """Each DP replica computed its own input (its TP ranks and stages the same one), so the comparison covers
    every replica's own broadcasts."""
    ids = {}
    for rank, out in enumerate(worlds.compare(case)):
        replica = coords(case.mesh, rank)[1]
        assert torch.equal(ids.setdefault(replica, out["ids"]), out["ids"])
    assert len(ids) == case.mesh[2]
    assert all(not torch.equal(ids[a], ids[b]) for a in ids for b in ids if a < b)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_layers_are_shared_on_one_host_else_broadcast(worlds, case):
    """DP ranks of one host read every series layer in place from one shared segment, the owner computing from the
    very copy the others read; with SHARDWISE_SHM=0 (set in the ranks before the load, as for ranks on different
    hosts) they broadcast through gloo, and the comparison above covers both paths."""
    outs = worlds.compare(case)
    assert {out["transfer"] for out in outs} == {"SharedSeries" if case.shm else "Gather"}
    assert all(out["owner reads the segment"] for out in outs)


def test_replicas_finishing_at_different_steps(worlds):
    """Generation with EOS at dp=2, each replica generating what it generates alone on resident weights: sharing
    the layers on one host, the replica that is done stops; broadcasting, it keeps broadcasting (padding with EOS)
    until both are."""
    early, late = worlds.result(2, "eos")
    assert early["checkpoint"] is not None, "no checkpoint has a token that only replica 0 generates"
    assert torch.equal(early["shared"], early["alone"]) and torch.equal(late["shared"], late["alone"])
    assert torch.equal(late["together"], late["alone"])
    stop = early["alone"].shape[1]
    assert stop < early["together"].shape[1], "replica 0 should have stopped before replica 1"
    assert torch.equal(early["together"][:, :stop], early["alone"])
    assert (early["together"][:, stop:] == early["eos"]).all()


# 2. Memory.


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_rank_stores_its_layers_plus_k_plus_1_windows(worlds, case):
    """Measured on every rank: a series holds the layers its DP rank owns (floor or ceil of layers/dp, so ranks
    differ when dp does not divide them, and the DP group holds the series exactly once) and k+1 windows of a layer."""
    dp = case.mesh[2]
    groups: dict[tuple[str, int, int], list[int]] = {}  # each series' held bytes over one DP group
    for rank, out in enumerate(worlds.compare(case)):
        stage, dp_rank, tp_rank = coords(case.mesh, rank)
        expected = stage_series(case.mesh, case.declared, rank)
        assert sorted(out["measured"]) == sorted(str(s) for s, _ in expected), f"rank {rank}"
        for s, names in expected:
            layer = out["sizes"][names[0]]
            assert all(out["sizes"][n] == layer for n in names)
            mine = owned(names, dp, dp_rank)
            assert len(mine) in (len(names) // dp, -(-len(names) // dp))
            want = {"held": len(mine) * layer, "windows": 0 if case.shm else (s.prefetch + 1) * layer}
            assert out["measured"][str(s)] == want, f"rank {rank} {s}"
            groups.setdefault((str(s), stage, tp_rank), []).append(want["held"])
            if dp_rank == dp - 1:
                held = groups[str(s), stage, tp_rank]
                assert sum(held) == len(names) * layer
                assert len(set(held)) == (1 if len(names) % dp == 0 else 2), f"{s}: ranks hold {held}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_plan_predicts_the_measured_series_bytes(worlds, case, deep):
    """``series_memory`` of each rank's plan is exactly what its provider allocated, and ``unsharded`` is what
    every rank would hold without the series."""
    spec = load_spec(deep[case.name])
    for rank, out in enumerate(worlds.compare(case)):
        predicted = series_memory(plan_rank(spec, case.layout, rank, "series", parse(case.declared)), case.dtype,
                                  shared=case.shm)
        assert {s: {"held": m["held"], "windows": m["windows"]} for s, m in predicted.items()} == out["measured"]
        for s, names in stage_series(case.mesh, case.declared, rank):
            assert predicted[str(s)]["unsharded"] == sum(out["sizes"][n] for n in names)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rank_holds_no_series_layer_it_does_not_own(worlds, case):
    """A rank's weights lack exactly the series layers other DP ranks store; its masters shrink by their bytes, and
    its only other memory is the windows."""
    for rank, out in enumerate(worlds.compare(case)):
        others = elsewhere(case.mesh, case.declared, rank)
        assert others <= set(out["resident tensors"])
        assert set(out["tensors"]) == set(out["resident tensors"]) - others, f"rank {rank}"
        assert out["nbytes"]["masters"] == out["resident masters"] - sum(out["sizes"][n] for n in others)
        assert out["nbytes"]["work"] == sum(m["windows"] for m in out["measured"].values())


def figures(table: str, series: str) -> dict[int, list[str]]:
    """The MB figures ``plan`` prints about one series, per rank, in order."""
    text = " ".join(line for line in table.splitlines() if line.startswith(f"series {series}"))
    parts = re.split(r"\b(?:rank |r)(\d+)\b", text.removeprefix(f"series {series}"))
    return {int(rank): re.findall(r"(-?\d+\.\d+) MB", part) for rank, part in zip(parts[1::2], parts[2::2])}


def windows_column(table: str) -> list[str]:
    """Each rank's figure in the table's windows column."""
    lines = table.splitlines()
    columns = lines[1].split("heads", 1)[1].split()
    return [re.findall(r"(\d+\.\d+) MB", row)[columns.index("windows")] for row in lines[2:]
            if re.match(r"\s*\d+\s", row)]


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def test_plan_prints_the_measured_figures(worlds, deep, capsys):
    """``shardwise plan --provider series --series '*.o,k=1' --series '*.down,k=2' --dp 2`` prints, per rank and
    series, the bytes stored, unsharded and in windows that the loaded ranks measured."""
    case = PLANNED
    path = str(deep[case.name])
    table = plan_table(path, case.layout, torch.float32, Provide("series", series=parse(case.declared)))
    main(["plan", path, "--dp", "2", "--provider", "series", "--series", "*.o,k=1", "--series", "*.down,k=2"])
    assert capsys.readouterr().out.strip() == table.strip()
    results = worlds.compare(case)
    for s, names in stage_series(case.mesh, case.declared, 0):
        shown = figures(table, str(s))
        assert sorted(shown) == [0, 1], table
        for rank, out in enumerate(results):
            m = out["measured"][str(s)]
            unsharded = sum(out["sizes"][n] for n in names)
            assert shown[rank][:3] == [mb(m["held"]), mb(unsharded), mb(m["windows"])], table
    windows = [sum(m["windows"] for m in out["measured"].values()) for out in results]
    assert windows_column(table) == [mb(w) for w in windows], table


# 3. Reading.


@pytest.mark.parametrize("case", CASES, ids=str)
def test_series_load_reads_only_its_own_layers(worlds, case):
    """A series load reads no byte of a series layer another DP rank stores: none of its checkpoint tensors is
    touched, and the rank reads exactly the resident load's bytes less those layers' (up to page rounding where a
    TP split makes strided reads)."""
    for rank, out in enumerate(worlds.compare(case)):
        reads, resident = out["reads"], out["resident reads"]
        others = elsewhere(case.mesh, case.declared, rank)
        skipped = {src for n in others for src in out["hf sources"][n]}
        assert skipped <= set(resident["sources"])
        assert not skipped & set(reads["sources"]), f"rank {rank} read {sorted(skipped & set(reads['sources']))}"
        assert resident["own"] - reads["own"] == sum(out["source sizes"][n] for n in others)
        message = f"rank {rank}: read {reads['bytes']} bytes in {reads['reads']} reads for {reads['own']} of its own"
        assert reads["own"] <= reads["bytes"] <= reads["own"] + 2 * reads["reads"] * PAGE, message
        assert reads["excess"] <= 0, f"rank {rank}: a read took {reads['excess']} bytes beyond {reads['where']}"
        if case.mesh[0] == 1:  # whole rows only: every read is exact
            assert reads["bytes"] == reads["own"], message
            assert resident["bytes"] - reads["bytes"] == sum(out["source sizes"][n] for n in others)


# 4. Declarations.


@pytest.fixture(scope="module")
def configs(deep, tmp_path_factory) -> dict[str, Path]:
    """Directories holding only a config.json: a load that got past planning would fail on the missing weights.
    ``o-bias`` is llama-tied with attention biases, o_proj's among them."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, change in (("llama", {}), ("o-bias", {"attention_bias": True})):
        config = json.loads((deep["llama-tied"] / "config.json").read_text()) | change
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        out[name] = root / name
    return out


BAD: dict[str, tuple[str, Layout, str, tuple[str, ...], str]] = {  # config, layout, provider, series, message
    "unknown pattern": ("llama", Layout(dp=2), "series", ("*.o_proj",), r"pattern '\*\.o_proj' matches no tensor"),
    "every tensor": ("llama", Layout(dp=2), "series", ("*",), r"matches differently shaped tensors"),
    "o and its bias": ("o-bias", Layout(dp=2), "series", ("*.o*",),
                       r"matches differently shaped tensors .*layers\.0\.o_bias"),
    "two norms per layer": ("llama", Layout(dp=2), "series", ("*_norm",), r"matches 2 tensors in layer 0"),
    "negative k": ("llama", Layout(dp=2), "series", ("*.o,k=-1",), r"k=-1 is out of range"),
    "k too large": ("llama", Layout(dp=2), "series", ("*.o,k=4",), r"k=4 is out of range.* 0 <= k <= 3"),
    "k too large for dp=3": ("llama", Layout(dp=3), "series", ("*.down,k=2,layers=1:4",),
                             r"k=2 is out of range.* 0 <= k <= 1"),
    "one layer": ("llama", Layout(dp=2), "series", ("*.o,k=0,layers=2:3",), r"k=0 is out of range"),
    "overlapping series": ("llama", Layout(dp=2), "series", ("*.o", "layers.*.o"),
                           r"overlaps series \*\.o,k=1: both claim layers\.0\.o"),
    "the same series twice": ("llama", Layout(dp=2), "series", ("*.down,k=0", "*.down,k=1"), r"overlaps series"),
    "dp=1": ("llama", Layout(), "series", ("*.o",), r"dp=1 leaves no rank"),
    "tp without dp": ("llama", Layout(tp=2), "series", ("*.o",), r"dp=1 leaves no rank"),
    "layers past the model": ("llama", Layout(dp=2), "series", ("*.o,layers=3:6",),
                              r"layers 3:6 are not a range within the model's 5 layers"),
    "empty layer range": ("llama", Layout(dp=2), "series", ("*.o,layers=2:2",), r"layers 2:2 are not a range"),
    "no declaration": ("llama", Layout(dp=2), "series", (), r"needs at least one series declaration"),
    "declared with resident": ("llama", Layout(dp=2), "resident", ("*.o",), r"need provider='series', not 'resident'"),
    "declared with zero3": ("llama", Layout(dp=2), "zero3", ("*.o",), r"need provider='series', not 'zero3'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_declaration_is_a_series_error_on_every_rank_before_reading(configs, case):
    """Every mistake is a SeriesError (a ValueError) from ``plan_rank`` on every rank, and ``load_weights`` raises
    it from a directory with no weights at all: nothing is opened before the declarations are checked."""
    config, layout, provider, declared, message = BAD[case]
    spec = load_spec(configs[config])
    for rank in range(layout.world_size):
        with pytest.raises(SeriesError, match=message):
            plan_rank(spec, layout, rank, provider, parse(declared))
        with pytest.raises(SeriesError, match=message):
            load_weights(configs[config], layout, rank=rank, progress=False, provider=provider, series=parse(declared))
    assert issubclass(SeriesError, ValueError)


@pytest.mark.parametrize("provider,declared,message", [
    ("series", (), r"needs at least one series declaration"),
    ("resident", ("*.o",), r"need provider='series', not 'resident'"),
    ("series", ("*.o",), r"dp=1 leaves no rank"),
])
def test_load_model_refuses_bad_declarations_before_reading(configs, provider, declared, message):
    """``load_model`` itself raises the SeriesError, from a directory with no weights: nothing was read."""
    with pytest.raises(SeriesError, match=message):
        load_model(configs["llama"], progress=False, provider=provider, series=parse(declared))


def test_a_declaration_given_as_text_is_a_series_error(configs):
    """The API takes ``Series`` objects; the CLI's text handed over as is names the parser to use."""
    with pytest.raises(SeriesError, match=r"Series\.parse\('\*\.o'\)"):
        load_weights(configs["llama"], Layout(dp=2), rank=0, progress=False, provider="series", series=("*.o",))


def test_bench_source_bytes_leave_out_the_layers_a_rank_does_not_store(deep):
    """``bench load`` reports the bytes a series rank reads: the resident share less the o_proj it does not own."""
    path, layout = deep["llama-tied"], Layout(dp=2)
    entries = Checkpoint(path).entries
    for rank in range(2):
        o_proj = [entries[f"model.layers.{n}.self_attn.o_proj.weight"] for n in range(LAYERS) if n % 2 != rank]
        others = sum(e.end - e.begin for e in o_proj)
        stored = source_bytes(path, layout, rank, "series", parse(("*.o",)))
        assert source_bytes(path, layout, rank) - stored == others, (rank, stored, others)


def test_k_is_checked_on_each_stage(configs):
    """With pp=2 over 5 layers, k=1 fits stage 0 (3 layers) and not stage 1 (2): only stage 1's ranks refuse it, and
    a series confined to stage 0's layers leaves stage 1 without any."""
    spec = load_spec(configs["llama"])
    layout = Layout(pp=2, dp=2)
    assert all(plan_rank(spec, layout, rank, "series", parse(("*.o,k=1",))).series for rank in (0, 1))
    for rank in (2, 3):
        with pytest.raises(SeriesError, match=r"k=1 is out of range: with 2 of its layers on this stage \(layers 3, 4"):
            plan_rank(spec, layout, rank, "series", parse(("*.o,k=1",)))
        assert plan_rank(spec, layout, rank, "series", parse(("*.o,k=1,layers=0:3",))).series == ()


@pytest.mark.parametrize("text,series", [
    ("*.o", Series("*.o")),
    ("*.down,k=0", Series("*.down", prefetch=0)),
    ("*.o,k=2,layers=0:4", Series("*.o", layers=(0, 4), prefetch=2)),
    ("layers.*.down,layers=1:3,k=1", Series("layers.*.down", layers=(1, 3), prefetch=1)),
])
def test_series_text_round_trips(text, series):
    """``Series.parse`` reads a declaration (fields in any order, k defaulting to 1), and reads back what ``str``
    writes, which is the CLI's and the sharded manifest's form."""
    assert Series.parse(text) == series
    assert Series.parse(str(series)) == series
    assert str(Series.parse(str(series))) == str(series)


@pytest.mark.parametrize("text", ["*.o,k=x", "*.o,k=", "*.o,k=1,k=2", "*.o,layers=1", "*.o,layers=a:b",
                                  "*.o,depth=1", ",k=1"])
def test_unreadable_series_text_is_a_series_error(text):
    with pytest.raises(SeriesError, match=re.escape(repr(text))):
        Series.parse(text)


def test_cli_refuses_unreadable_series_as_a_usage_error(deep, capsys):
    """``--series '*.o,k=x'`` is an argparse error (exit 2) that says what could not be read."""
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(deep["llama-tied"]), "--dp", "2", "--provider", "series", "--series", "*.o,k=x"])
    assert exit_.value.code == 2
    assert "cannot read 'k=x'" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--dp", "2", "--provider", "series", "--series", "*.o,k=30"], r"k=30 is out of range"),
    (["--dp", "2", "--provider", "series"], r"needs at least one series declaration"),
    (["--dp", "2", "--series", "*.o"], r"need provider='series', not 'resident'"),
    (["--provider", "series", "--series", "*.o"], r"dp=1 leaves no rank"),
], ids=["k=30", "no-series", "resident", "dp=1"])
def test_cli_refuses_bad_declarations_in_one_line(deep, args, message):
    """A declaration the model cannot honour ends ``shardwise plan`` with one line naming the SeriesError."""
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(deep["llama-tied"]), *args])
    code = exit_.value.code
    assert isinstance(code, str) and "\n" not in code, code
    assert code.startswith("shardwise: SeriesError: ") and re.search(message, code), code


# 5. Export and sharded saves.


def safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert name not in out, f"{name} is stored twice"
                out[name] = f.get_tensor(name)
    return out


def assert_same_bytes(original: Path, exported: Path) -> None:
    a, b = safetensors_dir(original), safetensors_dir(exported)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name


def round_trip(worlds: Worlds, mesh: Mesh, name: str) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    results = worlds.result(size(mesh), "round trip", mesh, name)
    return {kind: Path(p) for kind, p in worlds.dirs(mesh, name).items()}, results


ROUND_TRIP_IDS = [f"{label(m)}-{n}-to-{label(o)}" for m, n, _, o in ROUND_TRIPS]


@pytest.mark.parametrize("mesh,name,declared,other", ROUND_TRIPS, ids=ROUND_TRIP_IDS)
def test_export_from_a_series_is_byte_identical(worlds, deep, mesh, name, declared, other):
    """``export`` straight from series weights writes the original checkpoint's tensors byte for byte: each series
    layer by its one owner."""
    dirs, _ = round_trip(worlds, mesh, name)
    assert_same_bytes(deep[name], dirs["direct"])


@pytest.mark.parametrize("mesh,name,declared,other", ROUND_TRIPS, ids=ROUND_TRIP_IDS)
def test_sharded_series_reloads_elsewhere_and_exports_byte_identical(worlds, deep, mesh, name, declared, other):
    """HF -> series -> ``save_sharded`` -> loaded under another (resident) layout -> ``export``: the original bytes.
    The manifest records the series, each rank file holds what its rank owns (never another rank's series
    layers), and the sharded checkpoint loaded back under its series computes what the HF one does."""
    dirs, results = round_trip(worlds, mesh, name)
    assert_same_bytes(deep[name], dirs["resharded"])
    manifest = json.loads((dirs["sharded"] / "shardwise.json").read_text())
    assert manifest["layout"] == {"tp": mesh[0], "pp": mesh[1], "dp": mesh[2], "provider": "series",
                                  "series": [str(s) for s in parse(declared)]}
    files = {f["rank"]: f for f in manifest["files"]}
    for rank, out in enumerate(results):
        stored = {p["tensor"] for p in files[rank]["pieces"]}
        assert stored == set(out["owned"]), f"rank {rank}"
        theirs = {source for name in elsewhere(mesh, declared, rank) for source in out["sources"][name]}
        assert not {p["source"] for p in files[rank]["pieces"]} & theirs, f"rank {rank} saved layers it does not own"
        with safe_open(dirs["sharded"] / files[rank]["file"], framework="pt") as f:
            assert set(f.keys()) == stored
        assert out["same logits"], f"rank {rank}: the sharded checkpoint computes differently"


def test_cli_reshards_into_a_series_and_exports_it_back(deep, tmp_path, capsys):
    """``shardwise reshard --dp 2 --provider series --series ...`` saves a sharded checkpoint whose manifest carries
    the series, and ``shardwise export`` spawns its ranks under that series and writes the original bytes."""
    src, sharded, out = deep["qwen2-untied"], tmp_path / "sharded", tmp_path / "hf"
    main(["reshard", str(src), str(sharded), "--dp", "2", "--provider", "series", "--series", "*.o,k=2",
          "--series", "*.down,layers=1:5"])
    layout = json.loads((sharded / "shardwise.json").read_text())["layout"]
    assert layout == {"tp": 1, "pp": 1, "dp": 2, "provider": "series", "series": ["*.o,k=2", "*.down,k=1,layers=1:5"]}
    main(["export", str(sharded), str(out)])
    assert "exported by 2 ranks" in capsys.readouterr().out
    assert_same_bytes(src, out)


def test_bench_series_prints_one_json_line_with_every_setting(deep, capsys):
    """``shardwise bench series --json`` on a real (tiny) checkpoint: the four timing keys the issue names, the
    same tokens in every setting, and each series rank holding less than a plain replica plus its windows."""
    main(["bench", "series", str(deep["qwen2-untied"]), "--world", "2", "--new-tokens", "3", "--prompt-tokens", "4",
          "--repeats", "1", "--dtype", "float32", "--prefill-tokens", "8", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    row = json.loads(lines[0])
    for name in ("plain", "shared", "broadcast_k0", "broadcast_k1", "broadcast_k2"):
        assert row[f"{name}_s_per_token"] > 0 and row[f"{name}_prefill_s"] > 0, name
    assert row["same_tokens"] is True
    assert row["shared_provider"] == "SharedSeries"
    assert row["patterns"] == ["*.o", "*.down"] and row["ks"] == [0, 1, 2]
    spec, plain = load_spec(deep["qwen2-untied"]), row["held_bytes"]["plain"]
    one_layer = (spec.hidden * spec.heads * spec.head_dim + spec.hidden * spec.intermediate) * 4  # o + down, fp32
    for name, k in (("shared", None), ("broadcast_k0", 0), ("broadcast_k1", 1), ("broadcast_k2", 2)):
        held, windows = row["held_bytes"][name], row["window_bytes"][name]
        assert all(h < p for h, p in zip(held, plain)), (name, held, plain)
        assert windows == [0 if k is None else (k + 1) * one_layer] * 2, (name, windows)


# 6. The ring.


def ring_result(worlds: Worlds, case: Case) -> list[dict[str, Any]]:
    return worlds.result(size(case.mesh), "ring", case)


def broadcasts(trace: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """The (tensor, source DP rank) of each broadcast in a trace, in order."""
    return [(what.split(" from ")[0], int(what.split(" from ")[1])) for call, what in trace if call == "broadcast"]


def block(name: str) -> str:
    return name.rsplit(".", 1)[0]


@pytest.mark.parametrize("case", RINGS, ids=str)
def test_warm_forward_broadcasts_each_layer_once_k_ahead(worlds, case):
    """Once warm, a forward starts exactly one broadcast per series layer, from its owner: reaching position j
    (gather) starts position j+k (wrapping into the next forward), before j's weights are waited for (get)."""
    dp = case.mesh[2]
    for rank, out in enumerate(ring_result(worlds, case)):
        trace = out["traces"][1]
        sent = broadcasts(trace)
        expected = stage_series(case.mesh, case.declared, rank)
        assert Counter(n for n, _ in sent) == Counter(n for _, names in expected for n in names), f"rank {rank}"
        at = {step: i for i, step in enumerate(trace)}
        for s, names in expected:
            for j, tensor in enumerate(names):
                assert (tensor, j % dp) in sent, f"rank {rank}: {tensor} not sent by its owner {j % dp}"
                ahead = (j + s.prefetch) % len(names)
                where = at["broadcast", f"{names[ahead]} from {ahead % dp}"]
                assert at["gather", block(tensor)] < where < at["get", block(tensor)], f"rank {rank}: {names[ahead]}"


@pytest.mark.parametrize("case", RINGS, ids=str)
def test_ring_counts_broadcasts_per_forward(worlds, case):
    """stats(): a cold forward (and the first after ``invalidate()``) broadcasts n + k layers per series (the first
    layer waits for k+1), a warm one n, receiving only the layers owned elsewhere; with k >= 1 every layer of a
    warm forward is found already in its window. Invalidated, the forward repeats the cold one call for call."""
    dp = case.mesh[2]
    for rank, out in enumerate(ring_result(worlds, case)):
        expected = stage_series(case.mesh, case.declared, rank)
        per = [{k: b[k] - a[k] for k in a} for a, b in zip(out["stats"], out["stats"][1:])]
        cold = sum(len(names) + s.prefetch for s, names in expected)
        assert [p["gathers"] for p in per] == [cold, sum(len(names) for _, names in expected), cold], f"rank {rank}"
        assert per[1]["hits"] == sum(len(names) for s, names in expected if s.prefetch), f"rank {rank}"
        assert out["traces"][2] == out["traces"][0], f"rank {rank}: the invalidated forward differs from the cold one"
        received = 0
        for s, names in expected:
            layer = out["measured"][str(s)]["windows"] // (s.prefetch + 1)
            received += (len(names) - len(owned(names, dp, coords(case.mesh, rank)[1]))) * layer
        assert per[1]["bytes"] == received, f"rank {rank}"


MISUSES = {
    "get without gather": r"get\('layers\.1'\) without a gather",
    "gather twice": r"gather\('layers\.1'\) twice",
    "release never gathered": r"release\('layers\.2'\) of a block that is not gathered",
    "no free window": r"no free window for layers\.1\.o",
    "unknown block": r"gather\('layers\.9'\): no such block",
    "gather after close": r"gather\('layers\.1'\) after close\(\)",
}


@pytest.mark.parametrize("shm", [False, True], ids=["broadcast", "shared"])
@pytest.mark.parametrize("misuse", MISUSES)
def test_misuse_is_a_provider_error_naming_the_block(worlds, misuse, shm):
    """Out-of-order calls on a series provider raise ProviderError naming the rank, the provider and the block, on
    every DP rank alike (their broadcasts stay paired). Sharing the layers on one host there are no windows, so
    gathering ahead is no misuse there."""
    results = worlds.result(2, "misuse", shm)
    assert all(sorted(r) == sorted(MISUSES) for r in results)
    provider = "SharedSeries" if shm else "SeriesProvider"
    for rank, r in enumerate(results):
        if shm and misuse == "no free window":
            assert r[misuse] is None, r[misuse]
            continue
        assert r[misuse] is not None, f"rank {rank}: {misuse} raised nothing"
        assert re.search(rf"^rank {rank}: {provider}: .*{MISUSES[misuse]}", r[misuse]), r[misuse]


@pytest.mark.parametrize("shm", [False, True], ids=["broadcast", "shared"])
def test_update_hooks_hand_each_series_layer_to_its_owner_only(worlds, shm):
    """begin_update .. end_update hands out a series layer's master only on the rank that stores it; +1 on what is
    handed out computes what resident weights updated alike compute, after every layer is broadcast again (or, on
    one host, read again in place from the owner's updated copy)."""
    _, declared, name = UPDATED
    for rank, u in enumerate(worlds.result(2, "update", shm)):
        assert u["handed"] == [n for n in u["held"] if block(n) == name], f"rank {rank}"
        series_layer = {f"{name}.o", f"{name}.down"}
        assert series_layer & set(u["handed"]) == (series_layer if rank == 1 else set()), f"rank {rank}"
        assert not torch.equal(u["after"], u["before"]) and torch.isfinite(u["after"]).all()
        assert torch.equal(u["after"], u["resident after"]), f"rank {rank}: the updated series computes differently"
        broadcast = sum(len(n) + s.prefetch for s, n in stage_series((1, 1, 2), declared, rank))
        assert u["gathers after"] == (0 if shm else broadcast)

