"""Bad input fails fast with an error that names the culprit; nothing hangs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from workers import fail_on_rank, layout_from_world, load_only

from shardwise import (
    CheckpointError,
    LaunchTimeout,
    Layout,
    LayoutError,
    RankError,
    launch,
    load_model,
    load_spec,
    plan_rank,
)
from shardwise.launch import START_METHOD_ENV


@pytest.fixture
def ckpt(checkpoints, tmp_path) -> Path:
    """A private single-file copy (bf16, tied) to damage."""
    return Path(shutil.copytree(checkpoints["llama-tied"], tmp_path / "ckpt"))


def rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.+'.*truncated"):
        load_model(ckpt)


def test_truncated_inside_header(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header length \d+ runs past the end"):
        load_model(ckpt)


def test_header_lies_about_offsets(ckpt):
    def shift(header):
        header["model.norm.weight"]["data_offsets"][1] += 2

    rewrite_header(ckpt / "model.safetensors", shift)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': data_offsets .* span .* needs"):
        load_model(ckpt)


def test_overlapping_offsets(ckpt):
    def alias(header):
        header["model.norm.weight"]["data_offsets"] = header["model.layers.0.input_layernorm.weight"]["data_offsets"]

    rewrite_header(ckpt / "model.safetensors", alias)
    with pytest.raises(CheckpointError, match="overlap"):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    rewrite_header(ckpt / "model.safetensors", lambda h: h.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.down_proj\.weight' is missing"):
        load_model(ckpt)


def test_shape_disagrees_with_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*mlp.*' has shape \[.*\], but config"):
        load_model(ckpt)


def test_unknown_dtype(ckpt):
    rewrite_header(ckpt / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="F7"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': unknown dtype 'F7'"):
        load_model(ckpt)


def test_error_inside_a_rank_names_the_rank_and_file(ckpt):
    rewrite_header(ckpt / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="F7"))
    with pytest.raises(RankError, match=r"rank \d failed:(.|\n)*unknown dtype 'F7'") as info:
        launch(load_only, 2, str(ckpt), 2, 1, timeout=120)
    assert isinstance(info.value.__cause__, CheckpointError)


@pytest.mark.parametrize(
    "tp,pp,match",
    [(10, 1, "tp=10 exceeds the 9 query heads"), (1, 4, "pp=4 exceeds the 3 layers"), (0, 1, "must be >= 1")],
)
def test_impossible_layout(checkpoints, tp, pp, match):
    spec = load_spec(checkpoints["llama-tied"])
    with pytest.raises(LayoutError, match=match):
        plan_rank(spec, Layout(tp, pp), 0)


def test_layout_must_match_world(checkpoints):
    with pytest.raises(LayoutError, match="needs 2 ranks, the world has 1"):
        load_model(checkpoints["llama-tied"], Layout(tp=2))


@pytest.fixture(params=["spawn", "forkserver"])
def start(request, monkeypatch) -> str:
    """Both ways ranks start: spawned (the default), and forked from a forkserver."""
    monkeypatch.setenv(START_METHOD_ENV, request.param)
    return request.param


def test_rank_that_raises(start):
    with pytest.raises(RankError, match=r"rank 1 failed:(.|\n)*ValueError: boom on rank 1") as info:
        launch(fail_on_rank, 3, 1, "raise", timeout=120)
    assert info.value.rank == 1 and isinstance(info.value.__cause__, ValueError)


def test_rank_that_dies(start):
    with pytest.raises(RankError, match="rank 2 died with exit code 3"):
        launch(fail_on_rank, 3, 2, "die", timeout=120)


def test_rank_that_stalls_times_out(start):
    # The launch's deadline runs from its start, each rank's collective timeout (the same seconds) from its barrier:
    # the launcher always calls the stall first, however long the ranks took to start.
    with pytest.raises(LaunchTimeout, match=r"^(rank 1|ranks 0, 1) did not finish within 4s$"):  # rank 0 may lag
        launch(fail_on_rank, 2, 1, "stall", timeout=4)


def _children(pid: int) -> dict[int, bytes]:
    """The processes whose parent is ``pid``, with their command lines."""
    found = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found[int(proc.name)] = (proc / "cmdline").read_bytes()
    return found


def test_a_killed_forkserver_takes_its_ranks_along(monkeypatch):
    """The forked ranks' parent is the forkserver: killed (the OOM killer's way), it ends the launch with an error,
    and its ranks with it, however long they would have stalled."""
    monkeypatch.setenv(START_METHOD_ENV, "forkserver")
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(launch, fail_on_rank, 2, 1, "stall", timeout=120)
        ranks: dict[int, bytes] = {}
        deadline = time.monotonic() + 60
        while len(ranks) < 2 and time.monotonic() < deadline:
            servers = [pid for pid, cmd in _children(os.getpid()).items() if b"multiprocessing.forkserver" in cmd]
            ranks = _children(servers[0]) if servers else {}
            time.sleep(0.05)
        assert len(ranks) == 2, f"no forkserver with 2 ranks among {_children(os.getpid())}"
        os.kill(servers[0], signal.SIGKILL)
        with pytest.raises(RankError, match="died with exit code"):
            job.result(timeout=30)
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks), "ranks outlived their killed forkserver"


def test_an_unknown_start_method_is_refused(monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, "fork")
    with pytest.raises(ValueError, match="SHARDWISE_START_METHOD='fork': expected one of spawn, forkserver"):
        launch(torch.arange, 2, 5, timeout=120)


def test_ranks_see_the_launchers_environment_as_it_is_now(start, monkeypatch):
    launch(torch.arange, 1, 1, timeout=120)  # by now any forkserver has started, with the environment before
    monkeypatch.setenv("SHARDWISE_TEST_PROBE", "now")
    assert launch(os.getenv, 2, "SHARDWISE_TEST_PROBE", timeout=120) == "now"


def test_arguments_of_many_tensors_reach_the_ranks(start):
    """Hundreds of tensors as arguments: a process pickled with them would need a file descriptor per storage, more
    than a forkserver passes."""
    pieces = [torch.full((1,), float(i)) for i in range(300)]
    assert torch.equal(launch(torch.cat, 2, pieces, timeout=120), torch.arange(300.0))


def test_launch_returns_rank0_tensors():
    from workers import forward_and_generate  # noqa: F401 - proves the worker module imports in a fresh rank

    out = launch(torch.arange, 2, 5, timeout=120)
    assert torch.equal(out, torch.arange(5))


def test_layout_from_world():
    assert launch(layout_from_world, 4, 2, timeout=120) == Layout(tp=2, pp=2)
    with pytest.raises(RankError, match="world size 4 is not divisible by pp=3"):
        launch(layout_from_world, 4, 3, timeout=120)


def test_the_root_cause_is_reported_not_a_peer_echo():
    from workers import fail_with_an_echo_first

    with pytest.raises(RankError, match="rank 0 failed:(.|\n)*the real cause") as info:
        launch(fail_with_an_echo_first, 2, timeout=120)
    assert info.value.rank == 0
