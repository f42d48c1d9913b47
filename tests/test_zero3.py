"""ZeRO-3: the same numbers as resident weights on every mesh, quantized gathers within their bounds, master
shards that load, save, reshard and export bit-exactly, and a weights manager that refuses misuse.

Spawning ranks is the slow part, so one launch per world size runs every job of that size
(all checkpoints, all layouts and checks of that size); a one-rank world runs in this process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zero3_workers as zw
from conftest import CHECKPOINTS, PROMPT, STEPS
from safetensors import safe_open
from shared_launch import Failed, Job, in_one_thread, run_jobs, with_env

from shardwise import Layout, launch, load_model, load_spec, load_weights, plan_rank
from shardwise.dist.comm import Comm
from shardwise.plan.flat import ALIGN
from shardwise.providers.base import ProviderError
from shardwise.providers.zero3 import Zero3, memory_plan

Mesh = tuple[int, int, int]  # (tp, pp, dp)
EXACT = [(1, 1, 1), (1, 1, 2), (1, 1, 3), (1, 1, 4), (2, 1, 2), (1, 2, 2)]
QUANT_MESHES = [(1, 1, 1), (1, 1, 2), (1, 1, 3), (2, 1, 2)]  # uneven DP chunks, rows split between ranks, and TP
RESHARD: Mesh = (2, 1, 3)  # HF -> ZeRO-3 master shards here -> sharded -> tp=3 -> HF
INITS = [((1, 1, 1), "resident"), ((1, 1, 1), "zero3"), ((2, 1, 1), "resident"), ((1, 2, 1), "resident"),
         ((1, 1, 3), "zero3"), ((1, 1, 3), "resident"), ((2, 1, 2), "zero3")]
INIT_CONFIGS = ("qwen2-untied", "llama-tied")  # biases and an untied head; a tied bf16 one
UPDATED = ("llama-tied", "mistral-untied")  # the update round trip, at dp=1 and dp=2
SEED = 1234
PAGE = zw.PAGE
TIMEOUT = 180  # a rank stuck in a collective (a lockstep bug) fails the launch after this
SHM = ("1", "0")  # SHARDWISE_SHM: DP gathers through shared memory, or through gloo


def size(mesh: Mesh) -> int:
    return mesh[0] * mesh[1] * mesh[2]


class Worlds:
    """The jobs of each world size, launched once and cached: ``result(key)`` is every rank's value."""

    def __init__(self, checkpoints: dict[str, Path], root: Path):
        self.paths = {name: str(p) for name, p in checkpoints.items()}
        self.root = root
        self.results: dict[tuple, list[Any]] = {}
        self.failed: dict[int, BaseException] = {}
        self.launched: set[int] = set()

    def dirs(self, kind: str, names) -> dict[str, str]:
        return {name: str(self.root / kind / name) for name in names}

    def jobs(self, world: int) -> dict[tuple, Job]:
        jobs: dict[tuple, Job] = {}
        for mesh in EXACT:
            if size(mesh) == world:
                args = (*mesh, self.paths, PROMPT, STEPS, mesh in QUANT_MESHES)
                jobs["exact", mesh] = (zw.compare_layout, args)
        configs = {name: self.paths[name] for name in INIT_CONFIGS}
        for mesh, provider in INITS:
            if size(mesh) == world:
                outs = self.dirs(f"init-{provider}-{'x'.join(map(str, mesh))}", configs)
                jobs["init", mesh, provider] = (zw.init_and_export, (configs, outs, *mesh, provider, SEED))
        if world == size(RESHARD):
            jobs["reshard",] = (zw.reshard_zero3, (self.paths, self.dirs("sharded", self.paths), RESHARD[0],
                                                   RESHARD[2]))
        if world == 3 and ("reshard",) in self.results:
            jobs["export",] = (zw.export_resharded, (self.dirs("sharded", self.paths), self.dirs("hf", self.paths),
                                                     3))
        if world in (1, 2):
            for name in UPDATED:
                args = (self.paths[name], 1, 1, world, True, PROMPT, ("embed", "layers.1"))
                jobs["update", world, name] = (zw.update_round_trip, args)
        if world == 3:  # gathers through shared memory, and through gloo (SHARDWISE_SHM=0 set in the ranks)
            for shm in SHM:
                jobs["shm", shm] = (with_env, ({"SHARDWISE_SHM": shm}, zw.zero3_matches_resident,
                                               self.paths["qwen2-untied"], Layout(dp=3), PROMPT))
        if world == 2:  # last: a lockstep bug hangs the launch
            jobs["fail",] = (zw.fail_mid_gather, (self.paths["qwen2-untied"], PROMPT))
            jobs["eos",] = (zw.eos_lockstep, (self.paths, PROMPT, STEPS))
        return jobs

    def result(self, world: int, *key) -> list[Any]:
        if world in self.failed:  # once: a rerun would only find its own half-written outputs in the way
            raise RuntimeError(f"the {world}-rank launch failed") from self.failed[world]
        if world not in self.launched:
            if world == 3:  # the tp=3 export reads what the 6 ranks saved; their failure fails only the round trip
                with contextlib.suppress(Exception):
                    self.result(size(RESHARD), "reshard")
            jobs = self.jobs(world)
            try:
                if world == 1:
                    values = in_one_thread(lambda: run_jobs(list(jobs.values())))
                else:
                    values = launch(run_jobs, world, list(jobs.values()), timeout=TIMEOUT)
            except Exception as e:
                self.failed[world] = e
                raise
            self.results |= dict(zip(jobs, values))
            self.launched.add(world)
        values = self.results[key]
        failures = [f"rank {rank}:\n{v.error}" for rank, v in enumerate(values) if isinstance(v, Failed)]
        if failures:  # this job alone: the others of its launch ran on
            pytest.fail(f"job {key} raised:\n" + "\n".join(failures), pytrace=False)
        return values


@pytest.fixture(scope="module")
def worlds(checkpoints, tmp_path_factory) -> Worlds:
    return Worlds(checkpoints, tmp_path_factory.mktemp("zero3"))


def exact(worlds: Worlds, mesh: Mesh) -> list[dict[str, dict]]:
    return worlds.result(size(mesh), "exact", mesh)


def mismatches(worlds: Worlds, mesh: Mesh, a: str, b: str) -> list[str]:
    """Which (rank, checkpoint) pairs differ between outputs ``a`` and ``b``, logits or tokens, bit for bit."""
    bad = []
    for rank, per_rank in enumerate(exact(worlds, mesh)):
        for name, out in per_rank.items():
            (la, ta), (lb, tb) = out[a], out[b]
            if not torch.equal(la, lb):
                diff = (la.float() - lb.float()).abs().max().item()
                bad.append(f"rank {rank} {name}: logits differ by up to {diff:.3g}")
            if not torch.equal(ta, tb):
                bad.append(f"rank {rank} {name}: greedy tokens differ")
    return bad


# 1. Exactness.


@pytest.mark.parametrize("mesh", EXACT, ids=str)
def test_zero3_equals_resident_bit_for_bit(worlds, mesh):
    """ZeRO-3 fp32 logits and greedy tokens equal the resident model's of the same layout, on every rank."""
    results = exact(worlds, mesh)
    assert len(results) == size(mesh) and all(sorted(r) == sorted(CHECKPOINTS) for r in results)
    bad = mismatches(worlds, mesh, "zero3", "resident")
    assert not bad, bad


@pytest.mark.parametrize("mesh", EXACT, ids=str)
def test_cast_before_gather_equals_bf16_resident(worlds, mesh):
    """fp32 masters gathered as bf16 compute exactly what a resident bf16 load computes."""
    for per_rank in exact(worlds, mesh):
        assert all(out["zero3 bf16"][0].dtype == torch.bfloat16 for out in per_rank.values())
    bad = mismatches(worlds, mesh, "zero3 bf16", "resident bf16")
    assert not bad, bad


def test_replicas_fed_different_ids(worlds):
    """The DP replicas really computed different inputs, so the checks above cover each replica's own work."""
    results = exact(worlds, (1, 1, 4))
    ids = [r["llama-tied"]["ids"] for r in results]
    assert all(not torch.equal(ids[0], other) for other in ids[1:])


def test_replicas_finishing_at_different_steps_stay_in_lockstep(worlds):
    """ZeRO-3 dp=2 generate with EOS: a replica that is done keeps gathering (padding with EOS) until all are."""
    early, late = worlds.result(2, "eos")
    assert early["checkpoint"] is not None, "no checkpoint has a token that only replica 0 generates"
    eos = early["eos"]
    assert late["together"].shape == late["alone"].shape and torch.equal(late["together"], late["alone"])
    stop = early["alone"].shape[1]
    assert stop < early["together"].shape[1], "replica 0 should have stopped before replica 1"
    assert torch.equal(early["together"][:, :stop], early["alone"])
    assert (early["together"][:, stop:] == eos).all()


def test_a_gather_failing_on_one_rank_stops_its_peer_in_seconds(worlds):
    """Rank 1's part of a shared-memory gather fails as it is filled: rank 0, whose timeout is the launch's, gets an
    error naming rank 1 within seconds, and rank 1 has given back the slot and counters it took, holding nothing."""
    peer, failing = worlds.result(2, "fail")
    assert failing["transfer"] == "ShmGather"
    assert failing["error"] == "injected failure of rank 1's fill"
    assert peer["error"] and "ranks [1] failed part-way through a transfer" in peer["error"], peer["error"]
    assert peer["seconds"] < 10 < TIMEOUT, f"rank 0 waited {peer['seconds']:.1f}s for the rank that failed"
    assert sum(failing["acquired"]) == 1 and failing["released"] == failing["acquired"], failing
    assert failing["held"] == [] and not any(failing["users"]) and not any(failing["taken"]), failing
    assert failing["holding"] == [None] * len(failing["holding"]), "a slot claims the bytes its failed fill never made"


# 2. Quantized gathers.


@pytest.mark.parametrize("mesh", QUANT_MESHES, ids=str)
@pytest.mark.parametrize("dtype", zw.QUANTIZED, ids=str)
def test_quantized_work_weights_within_documented_bound(worlds, mesh, dtype):
    """Every work tensor a fp8/int8 gather hands out is within quant.py's bound of the fp32 weights, elementwise."""
    for rank, per_rank in enumerate(exact(worlds, mesh)):
        for name, out in per_rank.items():
            worst = out[f"bound {dtype}"]
            assert worst["tensors"] > 0
            assert worst["ratio"] <= 1.0, (f"rank {rank} {name}: {worst['tensor']} is off by {worst['err']:.3g}, "
                                           f"bound {worst['bound']:.3g}")


@pytest.mark.parametrize("mesh", QUANT_MESHES, ids=str)
@pytest.mark.parametrize("dtype", zw.QUANTIZED, ids=str)
def test_quantized_gathers_compute_the_documented_quantization(worlds, mesh, dtype):
    """fp8/int8 gathers give, bit for bit, the logits and tokens of fp32 weights quantized as quant.py documents
    (scales per tensor or row of the whole work tensor, whichever DP rank holds which part of it)."""
    bad = mismatches(worlds, mesh, f"quantized {dtype}", f"emulated {dtype}")
    assert not bad, bad


# 3. Round trip through master-shard boxes.


def safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert name not in out, f"{name} is stored twice"
                out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_round_trip_through_zero3_shards_is_bit_exact(worlds, name, checkpoints):
    """HF -> ZeRO-3 shards at tp=2 x dp=3 -> sharded save -> tp=3 -> HF export: the same tensors, dtypes and bytes."""
    worlds.result(size(RESHARD), "reshard")
    errors = {e[name] for e in worlds.result(3, "export")}
    assert errors == {None}, errors
    sharded = worlds.root / "sharded" / name
    layout = json.loads((sharded / "shardwise.json").read_text())["layout"]
    assert layout == {"tp": 2, "pp": 1, "dp": 3, "provider": "zero3", "series": []}
    original, exported = safetensors_dir(checkpoints[name]), safetensors_dir(worlds.root / "hf" / name)
    assert len(list((worlds.root / "hf" / name).glob("*.safetensors"))) > 1, "max_file_bytes should split files"
    assert sorted(original) == sorted(exported)
    for tensor, a in original.items():
        b = exported[tensor]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), tensor
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{tensor} changed in the round trip"


# 4. Bytes read.


def read_counts(worlds: Worlds, mesh: Mesh) -> list[tuple[str, dict[str, Any]]]:
    """What each rank's ZeRO-3 load read, per checkpoint."""
    if mesh == RESHARD:
        return [(f"rank {r} {n}", c) for r, per in enumerate(worlds.result(6, "reshard")) for n, c in per.items()]
    return [(f"rank {r} {n}", o["reads"]) for r, per in enumerate(exact(worlds, mesh)) for n, o in per.items()]


ZERO3_MESHES = [m for m in EXACT if m[2] > 1] + [RESHARD]


@pytest.mark.parametrize("mesh", ZERO3_MESHES, ids=str)
def test_master_shard_load_reads_only_its_bytes(worlds, mesh):
    """Loading a ZeRO-3 master shard reads all of its boxes' bytes, and no more than a page per read beyond them."""
    for who, c in read_counts(worlds, mesh):
        message = (f"{who}: read {c['bytes']} bytes in {c['reads']} reads for {c['own']} bytes of its own "
                   f"({c['pieces']} pieces)")
        assert c["own"] <= c["bytes"] <= c["own"] + 2 * c["reads"] * PAGE, message


@pytest.mark.parametrize("mesh", ZERO3_MESHES, ids=str)
def test_no_single_read_exceeds_its_box_by_page_rounding(worlds, mesh):
    """Per read, too: a read takes at most a page beyond its box at each end of each contiguous run of it."""
    for who, c in read_counts(worlds, mesh):
        assert c["excess"] <= 0, f"{who}: a read took {c['excess']} bytes beyond page rounding of {c['where']}"


# 5. Initialisation.


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("mesh,provider", INITS[1:], ids=[f"{m}-{p}" for m, p in INITS[1:]])
def test_init_exports_the_same_checkpoint_on_every_layout(worlds, mesh, provider):
    """init_weights then export gives byte-identical files whatever (tp, pp, dp) and provider made them."""
    reference_mesh, reference_provider = INITS[0]
    worlds.result(size(reference_mesh), "init", reference_mesh, reference_provider)
    worlds.result(size(mesh), "init", mesh, provider)
    for name in INIT_CONFIGS:
        reference = digests(worlds.root / f"init-{reference_provider}-1x1x1" / name)
        got = digests(worlds.root / f"init-{provider}-{'x'.join(map(str, mesh))}" / name)
        assert len(reference) >= 4 and "config.json" in reference
        assert got == reference, f"{name}: files differ: {[f for f in reference if got.get(f) != reference[f]]}"


# 6. The weights manager.


def updates(worlds: Worlds) -> list[tuple[str, dict[str, Any]]]:
    """Every rank's update round trip, at dp=1 in this process and at dp=2 in two ranks, tied and untied."""
    out = []
    for world in (1, 2):
        for name in UPDATED:
            per_rank = worlds.result(world, "update", world, name)
            out += [(f"dp={world} rank {r} {name}", v) for r, v in enumerate(per_rank)]
    return out


def test_untouched_update_round_trip_keeps_masters(worlds):
    """fetch_master/release_master with offload and no change leaves every master bit-identical; the version
    bump still makes every block gather again (embedding and head included), and the logits are unchanged."""
    for who, u in updates(worlds):
        assert sorted(u["untouched"]) == sorted(u["before"]), who
        for block, t in u["before"].items():
            assert torch.equal(u["untouched"][block], t), f"{who}: master {block} changed"
        assert torch.equal(u["logits untouched"], u["logits before"]), who
        first, second = u["gathers"][1] - u["gathers"][0], u["gathers"][2] - u["gathers"][1]
        assert first == u["flats"] and second < first, f"{who}: {first} then {second} gathers for {u['flats']} flats"


def test_update_round_trip_changes_masters_exactly(worlds):
    """+1 on fetched masters lands in the offloaded masters only at release_master, on exactly those blocks, and
    the next forward gathers everything again and computes what resident weights updated alike compute."""
    for who, u in updates(worlds):
        assert u["blocks"] == ("embed", "layers.1"), who
        for block, t in u["before"].items():
            assert torch.equal(u["during"][block], t), f"{who}: {block} changed before release_master"
            expected = t + 1 if block in u["blocks"] else t
            assert torch.equal(u["after"][block], expected), f"{who}: master {block} is not what the update made"
        assert u["gathers after"] == u["flats"], who
        assert not torch.equal(u["logits after"], u["logits before"]), who
        assert torch.equal(u["logits after"], u["resident after"]), f"{who}: forward after the update differs"


@pytest.fixture
def zero3(checkpoints):
    """A one-rank ZeRO-3 model with no prefetch and offloaded masters: two fetch buffers, one ring slot."""
    with load_model(checkpoints["qwen2-untied"], provider="zero3", prefetch=0, offload=True, progress=False) as m:
        yield m


def cycle(provider, block: str) -> dict[str, torch.Tensor]:
    provider.gather(block)
    tensors = {name: t.clone() for name, t in provider.get(block).items()}
    provider.release(block)
    return tensors


def test_version_cache_skips_regathering_until_invalidated(checkpoints):
    """A block still in its slot is served again without a gather, until invalidate() bumps the version."""
    with load_model(checkpoints["llama-untied"], provider="zero3", progress=False) as model:
        p = model.provider
        first = cycle(p, "layers.1")
        s1 = p.stats()
        assert (s1["gathers"], s1["hits"]) == (1, 0) and s1["bytes"] > 0
        again = cycle(p, "layers.1")
        s2 = p.stats()
        assert (s2["gathers"], s2["bytes"], s2["hits"]) == (s1["gathers"], s1["bytes"], s1["hits"] + 1)
        assert all(torch.equal(first[n], again[n]) for n in first)
        p.invalidate()
        cycle(p, "layers.1")
        s3 = p.stats()
        assert (s3["gathers"], s3["hits"]) == (s2["gathers"] + 1, s2["hits"])
        assert s3["bytes"] - s2["bytes"] == s1["bytes"]


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_stream_prefetches_k_blocks_ahead(checkpoints, prefetch):
    """One forward with prefetch k: block l+k is gathered before block l is waited for, every block is released,
    and at most k+1 blocks (so k+1 layers) hold buffers at once."""
    with load_model(checkpoints["qwen3-tied"], provider="zero3", prefetch=prefetch, progress=False) as model:
        p = model.provider
        p.trace = []
        model(PROMPT)
        trace, blocks = p.trace, list(model.plan.blocks)
    at = {step: i for i, step in enumerate(trace)}
    assert len(at) == len(trace) == 3 * len(blocks), trace
    assert [b for call, b in trace if call == "get"] == blocks
    for i, block in enumerate(blocks):
        assert ("release", block) in at and at["get", block] < at["release", block]
        if i + prefetch < len(blocks):
            assert at["gather", blocks[i + prefetch]] < at["get", block], f"{blocks[i + prefetch]} gathered late"
    held: set[str] = set()
    most = most_layers = 0
    for call, block in trace:
        held = held | {block} if call == "gather" else held - {block} if call == "release" else held
        most, most_layers = max(most, len(held)), max(most_layers, sum(b.startswith("layers.") for b in held))
    assert not held
    assert most <= prefetch + 1 and most_layers <= prefetch + 1
    assert most == prefetch + 1, "prefetch k should keep k+1 blocks in flight"


MISUSES: dict[str, tuple[Callable, str]] = {
    "get without gather": (lambda p: p.get("layers.1"), r"get\('layers\.1'\) without a gather"),
    "gather twice": (lambda p: [p.gather("layers.1"), p.gather("layers.1")], r"gather\('layers\.1'\) twice"),
    "release twice": (lambda p: [cycle(p, "layers.1"), p.release("layers.1")],
                      r"release\('layers\.1'\) of a block that is not gathered"),
    "release never gathered": (lambda p: p.release("head"), r"release\('head'\) of a block that is not gathered"),
    "unknown block": (lambda p: p.gather("layers.7"), r"gather\('layers\.7'\): no such block"),
    "master without fetch": (lambda p: [p.begin_update(), p.master("layers.1")],
                             r"master\('layers\.1'\) without fetch_master"),
    "fetch outside an update": (lambda p: p.fetch_master("layers.1"),
                                r"fetch_master\('layers\.1'\) outside begin_update"),
    "end_update with a fetched master": (lambda p: [p.begin_update(), p.fetch_master("layers.1"), p.end_update()],
                                         r"end_update\(\) with masters still fetched: layers\.1"),
    "begin_update twice": (lambda p: [p.begin_update(), p.begin_update()], r"begin_update\(\) twice"),
    "third fetch with offload": (lambda p: [p.begin_update(), p.fetch_master("layers.0"), p.fetch_master("embed"),
                                            p.fetch_master("head")],
                                 r"fetch_master\('head'\): both fetch buffers hold layers\.0, embed"),
    "more layers than buffers": (lambda p: [p.gather("layers.0"), p.gather("layers.1")],
                                 r"no free buffer for 'layers\.1': layers\.0 still in use"),
}


@pytest.mark.parametrize("misuse", MISUSES)
def test_misuse_is_a_provider_error_naming_the_block(zero3, misuse):
    """Every out-of-order call raises ProviderError naming the rank, the provider and the block."""
    call, message = MISUSES[misuse]
    with pytest.raises(ProviderError, match=rf"^rank 0: Zero3: .*{message}"):
        call(zero3.provider)


def test_updates_wait_for_released_blocks_and_stale_gathers_are_redone(zero3):
    """An update cannot start while a block is gathered; a block gathered before invalidate() is gathered again."""
    p = zero3.provider
    old = cycle(p, "layers.1")
    p.gather("layers.1")
    with pytest.raises(ProviderError, match=r"begin_update\(\) while layers\.1 are gathered"):
        p.begin_update()
    before = p.stats()["gathers"]
    p.invalidate()
    new = p.get("layers.1")
    p.release("layers.1")
    assert p.stats()["gathers"] == before + 1, "a block gathered before invalidate() must be gathered again"
    assert all(torch.equal(new[n], old[n]) for n in old)


@pytest.mark.parametrize("provider", ["resident", "zero3"])
def test_update_hooks_hand_out_each_master_once(checkpoints, provider):
    """Over all blocks, the update hooks hand out every master tensor once: a tied embedding is not updated twice."""
    with load_model(checkpoints["llama-tied"], provider=provider, progress=False) as model:
        p, seen = model.provider, {}
        p.begin_update()
        for block in model.plan.blocks:
            p.fetch_master(block)
            for name, t in p.master(block).items():
                key = (t.untyped_storage().data_ptr(), t.storage_offset())
                assert key not in seen, f"{block}: {name} is also handed out by {seen[key]}"
                seen[key] = block
            p.release_master(block)
        p.end_update()


MEMORY_LAYOUTS = [Layout(), Layout(tp=2, dp=3), Layout(pp=2, dp=2), Layout(tp=3, dp=2)]


@pytest.mark.parametrize("layout", MEMORY_LAYOUTS, ids=str)
def test_memory_plan_is_what_zero3_allocates(checkpoints, layout):
    """Zero3.nbytes() equals memory_plan() on every rank, for every work dtype, prefetch and offload; and the
    masters of a DP group add up to one replica's weights plus alignment padding only."""
    cpu = torch.device("cpu")
    for name in ("llama-tied", "qwen3-untied"):
        group: dict[tuple[int, int], int] = {}  # masters bytes over each DP group
        for rank in range(layout.world_size):
            w = load_weights(checkpoints[name], layout, dtype=torch.float32, rank=rank, progress=False,
                             provider="zero3")
            for work in (None, torch.bfloat16, torch.float8_e4m3fn, torch.int8):
                for prefetch in (0, 1, 2):
                    for offload in (False, True):
                        alone = Comm(Layout(), 0)  # no process group: private slots, as gloo gathers use
                        got = Zero3(w.plan, alone, dict(w.buffers), work, prefetch, offload, cpu).nbytes()
                        want = memory_plan(w.plan, torch.float32, work, prefetch, offload)
                        assert got == want, f"{name} rank {rank} work={work} prefetch={prefetch} offload={offload}"
            stage, _, tp_rank = layout.coords(rank)
            group[stage, tp_rank] = group.get((stage, tp_rank), 0) + sum(t.nbytes for t in w.buffers.values())
        one_replica = Layout(layout.tp, layout.pp)
        for (stage, tp_rank), total in group.items():
            plan = plan_rank(load_spec(checkpoints[name]), one_replica, one_replica.rank_of(stage, 0, 0, tp_rank))
            replica = plan.nbytes(torch.float32)
            slack = (ALIGN * len(plan.work) + layout.dp * len(plan.blocks)) * 4  # member alignment, chunk rounding
            assert replica <= total <= replica + slack, f"{name} stage {stage} tp rank {tp_rank}: {total} bytes"


def test_loaded_model_memory_matches_its_plan(checkpoints):
    """A loaded ZeRO-3 model's provider allocates what memory_plan promises for its own plan and options."""
    with load_model(checkpoints["mistral-untied"], provider="zero3", work_dtype=torch.int8, prefetch=2,
                    offload=True, progress=False) as model:
        nbytes = model.provider.nbytes()
        assert nbytes == memory_plan(model.plan, torch.float32, torch.int8, 2, True)
        assert min(nbytes.values()) > 0


@pytest.mark.parametrize("options,message", [
    (dict(provider="nope"), "unknown provider 'nope'"),
    (dict(work_dtype=torch.bfloat16), "need provider='zero3'"),
    (dict(offload=True), "need provider='zero3'"),
    (dict(provider="zero3", prefetch=-1), "prefetch must be an int >= 0"),
    (dict(provider="zero3", prefetch=True), "prefetch must be an int >= 0"),
    (dict(provider="zero3", work_dtype=torch.float64), "work_dtype torch.float64 is not one of"),
], ids=["provider", "work_dtype", "offload", "prefetch", "prefetch-bool", "work_dtype-float64"])
def test_load_model_refuses_bad_options_before_reading(tmp_path, options, message):
    """Meaningless provider options are a ValueError before any file is opened (the path does not even exist)."""
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "missing", progress=False, **options)


@pytest.mark.parametrize("shm", SHM)
def test_gathers_through_shared_memory_and_gloo_agree(worlds, shm):
    """Same-host DP ranks gather through shared memory; with SHARDWISE_SHM=0 through gloo; both are exact."""
    equal, transfer = worlds.result(3, "shm", shm)[0]
    assert equal, f"ZeRO-3 bf16 gathers over {transfer} differ from a resident bf16 model"
    assert transfer == ("ShmGather" if shm == "1" else "Gather")


def test_shared_memory_gather_catches_ranks_out_of_lockstep():
    """Two DP ranks' views of one segment: a fill of another block is an error at wait, never silently mixed bytes."""
    import mmap
    from types import SimpleNamespace

    from shardwise.dist.transfers import ShmGather, flag_bytes

    sizes = [64]
    mem = mmap.mmap(-1, flag_bytes(1, 2) + 64)
    ranks = [ShmGather(SimpleNamespace(layout=Layout(dp=2), dp_ranks=[0, 1], rank=r), sizes, mem, r, 5.0,
                       "ZeRO-3 gather")
             for r in range(2)]
    for r, g in enumerate(ranks):  # in step: both fill block 0, version 1
        g.acquire(0)
        g.fill(0, torch.full((32,), r, dtype=torch.uint8), tag=1)
    for g in ranks:
        g.wait(0)
        g.release(0)
    assert ranks[0].buffers[0].tolist() == [0] * 32 + [1] * 32
    for r, g in enumerate(ranks):  # out of step: rank 1 fills another block
        g.acquire(0)
        region = g.claim(0, 32)
        region.fill_(7)
        g.fill(0, region, tag=2 if r == 0 else 3 << 32)
    with pytest.raises(RuntimeError, match=r"rank 0: ZeRO-3 gather, slot 0: ranks \[1\] filled it with something else"):
        ranks[0].wait(0)
