"""`bench zero3` end to end on a tiny checkpoint: every key is there and sane. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from shardwise.bench.zero3 import ZERO3_SETTINGS, bench_zero3_rank
from shardwise.launch import launch


def test_bench_zero3_reports_every_setting(checkpoints):
    lines = launch(bench_zero3_rank, 2, str(checkpoints["llama-untied"]), 16, 1, 1, True)
    json.dumps(lines)  # what `bench zero3 --json` prints, one line each
    by = {line["setting"]: line for line in lines}
    assert list(by) == [*ZERO3_SETTINGS, "gather_probe", "summary"]
    summary = by["summary"]
    for name in ZERO3_SETTINGS:
        line = by[name]
        if name == "fsdp2" and line.get("fsdp2_s") is None:  # FSDP2 may not run here; then it says why
            assert isinstance(summary["fsdp2_error"], str) and summary["fsdp2_error"]
            continue
        assert isinstance(summary[f"{name}_s"], float) and summary[f"{name}_s"] > 0
        assert summary[f"{name}_s"] == line["s"] == max(line["rank_s"])
        assert len(line["peak_rss_mb"]) == 2 and all(mb > 0 for mb in line["peak_rss_mb"])
        assert summary["peak_rss_mb"][name] == line["peak_rss_mb"]
    for name in ("sharded", "sharded_fp8", "sharded_int8"):
        line = by[name]
        assert line["gathers"] == 3 and line["hits"] == 2  # the layers each forward; embed and head cached
        assert 0 < line["gather_bytes"] < line["first_gather_bytes"]
        assert line["plan_bytes"] == line["allocated_bytes"] and all(b > 0 for b in line["plan_bytes"])
        assert summary["plan_bytes"][name] == line["plan_bytes"] == summary["allocated_bytes"][name]
        for rank in line["profile"]:
            assert rank["compute"] > 0 and set(rank["blocks"]) == {"embed", "layers.0", "layers.1", "layers.2", "head"}
    assert isinstance(summary["gather_bytes_bf16"], int) and isinstance(summary["gather_bytes_fp8"], int)
    assert 0 < summary["gather_bytes_fp8"] < summary["gather_bytes_bf16"]
    assert by["gather_probe"]["bytes"] > 0 and by["gather_probe"]["all_gather_s"] > 0


def test_bench_train_reports_every_setting_training_alike(checkpoints):
    from shardwise.bench.train import TRAIN_SETTINGS, bench_train_rank, train_summary

    # a rate large enough that clipping, weight decay and the moments all shape the later losses
    lines = launch(bench_train_rank, 2, str(checkpoints["llama-untied"]), 8, 1, 2, 1, 3e-2)
    lines.append(train_summary(lines, 2, 1, 8, 2))
    json.dumps(lines)
    by = {line["setting"]: line for line in lines}
    assert list(by) == [*TRAIN_SETTINGS, "summary"]
    summary = by["summary"]
    for name in TRAIN_SETTINGS:
        line = by[name]
        assert summary[f"{name}_tokens_per_s"] == line["tokens_per_s"] == 2 * 8 / line["step_s"] > 0
        assert summary[f"{name}_peak_rss_mb"] == max(line["peak_rss_mb"]) >= max(line["train_peak_rss_mb"]) > 0
        assert len(line["losses"]) == 3
        # the same weights, data and update: the same losses, step after step
        assert line["losses"] == pytest.approx(by["fsdp2"]["losses"], rel=1e-4)
    losses = by["fsdp2"]["losses"]
    assert losses[2] < losses[0] - 0.1, losses  # the updates are not vanishingly small
    assert summary["zero3_over_fsdp2_tokens_per_s"] == summary["zero3_tokens_per_s"] / summary["fsdp2_tokens_per_s"]
