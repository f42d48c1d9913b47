"""Export and reshard: bit-exact round trips through any layouts, and nothing lost on a crash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTS, PROMPT
from shared_launch import SharedLaunches
from test_cli import shardwise
from workers import export_all, export_and_die, export_model, forward_and_generate, reshard_all

from shardwise import Box, Checkpoint, CheckpointError, RankError, ShardedCheckpoint, launch, load_spec


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as ck:
        out = {}
        for name, e in ck.entries.items():
            out[name] = torch.empty(e.shape, dtype=e.dtype)
            ck.read(Box(name, (0,) * len(e.shape), e.shape, (0,) * len(e.shape)), out[name])
        return out


def assert_same_checkpoint(original: Path, exported: Path) -> None:
    a, b = tensors(original), tensors(exported)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{name}: dtype {b[name].dtype}, originally {a[name].dtype}"
        assert torch.equal(a[name], b[name]), f"{name} differs after the round trip"
    assert load_spec(original) == load_spec(exported)
    assert (exported / "model.safetensors.index.json").exists()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("roundtrip")


@pytest.fixture(scope="module")
def launches(checkpoints, work) -> SharedLaunches:
    """The writes of this module, one launch per world size: spawning ranks is the slow part. The 6 ranks write the
    sharded checkpoints that the 2 and 4 ranks read."""
    src = {n: str(p) for n, p in checkpoints.items()}
    s32 = {n: str(work / f"{n}-tp3pp2") for n in src}
    s2 = {n: str(work / f"{n}-tp2") for n in src}
    hf = {n: str(work / f"{n}-hf") for n in src}
    jobs = {
        # HF -> sharded at TP=3 x PP=2 -> resharded to TP=2 -> exported by those 2 ranks, for every checkpoint
        ("reshard", 6): (6, reshard_all, (src, s32, 3, 2)),
        ("reshard", 2): (2, reshard_all, (s32, s2, 2, 1)),
        ("export", 2): (2, export_all, (s2, hf, 2, 1)),
        # the checkpoint a killed export must leave intact
        ("previous",): (2, export_all, ({"m": src["mistral-untied"]}, {"m": str(work / "ckpts" / "model")}, 2, 1)),
        ("another layout",): (4, forward_and_generate, (4, 1, {"q": s32["qwen3-untied"]}, PROMPT, 16)),
        # bf16 on disk, run in fp32 at TP=2 x PP=2
        ("fp32",): (4, export_model, (src["llama-tied"], str(work / "fp32-out"), 2, 2)),
    }
    return SharedLaunches(jobs, timeout=600, needs={2: (6,), 4: (6,)})


@pytest.fixture(scope="module")
def round_trip(checkpoints, work, launches) -> dict[str, Path]:
    """HF -> sharded at TP=3 x PP=2 -> resharded to TP=2 -> exported by those 2 ranks, for every checkpoint."""
    for step in (("reshard", 6), ("reshard", 2), ("export", 2)):
        launches.result(step)
    return {n: work / f"{n}-hf" for n in checkpoints} | {f"{n}-tp3pp2": work / f"{n}-tp3pp2" for n in checkpoints}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_round_trip_is_bit_exact(name, checkpoints, round_trip):
    assert_same_checkpoint(checkpoints[name], round_trip[name])


def test_sharded_checkpoint_runs_under_another_layout(checkpoints, references, round_trip, launches):
    sharded = round_trip["qwen3-untied-tp3pp2"]
    assert ShardedCheckpoint(sharded).layout.world_size == 6
    logits, tokens = launches.result(("another layout",))[0]["q"]
    ref_logits, ref_tokens = references["qwen3-untied"]
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    assert torch.equal(tokens, ref_tokens)


def test_export_from_fp32_model_keeps_original_dtypes(checkpoints, work, launches):
    src = checkpoints["llama-tied"]  # bf16 on disk, run in fp32 at TP=2 x PP=2
    launches.result(("fp32",))
    assert_same_checkpoint(src, work / "fp32-out")


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def looks_complete(directory: Path) -> bool:
    index = directory / "model.safetensors.index.json"
    if not (index.exists() and (directory / "config.json").exists()):
        return False
    files = set(json.loads(index.read_text())["weight_map"].values())
    return all((directory / f).exists() for f in files)


def test_killed_rank_leaves_previous_checkpoint_intact(checkpoints, work, launches):
    out = work / "ckpts" / "model"
    launches.result(("previous",))  # mistral-untied, exported by 2 ranks
    before = digest(out)
    with pytest.raises(RankError, match="rank 1 died with exit code 9"):
        launch(export_and_die, 2, str(checkpoints["qwen2-untied"]), str(out), 2, 1, timeout=300)
    assert digest(out) == before, "the previous checkpoint changed"
    others = [d for d in out.parent.iterdir() if d != out]
    assert not any(looks_complete(d) for d in others), f"a complete-looking checkpoint was left: {others}"


def test_cli_reshard_then_export(checkpoints, tmp_path):
    src = checkpoints["qwen2-tied"]
    out = shardwise("reshard", str(src), str(tmp_path / "s"), "--tp", "3")
    assert out.returncode == 0, out.stderr
    assert ShardedCheckpoint(tmp_path / "s").layout.tp == 3
    out = shardwise("export", str(tmp_path / "s"), str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    assert_same_checkpoint(src, tmp_path / "hf")


def test_manifest_missing_tensor(round_trip, tmp_path):
    import shutil

    bad = Path(shutil.copytree(round_trip["llama-untied-tp3pp2"], tmp_path / "bad"))
    manifest = json.loads((bad / "shardwise.json").read_text())
    del manifest["tensors"]["model.norm.weight"]
    (bad / "shardwise.json").write_text(json.dumps(manifest))
    from shardwise import load_weights

    with pytest.raises(CheckpointError, match=r"shardwise\.json: .*tensor 'model\.norm\.weight' is missing"):
        load_weights(bad)
