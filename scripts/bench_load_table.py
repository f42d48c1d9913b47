"""Make the 349M-parameter Llama of issue 2 (if missing) and tabulate `shardwise bench load` against HF and the floor.

    python scripts/bench_load_table.py [--dir bench-data/llama-349m] [--tp 1 2 4]

The checkpoint is random bf16 weights in 3 safetensors files plus an index, written
from the model spec, so no hub is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from shardwise.plan.spec import spec_from_config

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 24,
    "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
    "hidden_act": "silu", "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
}


def make_checkpoint(directory: Path, files: int = 3) -> None:
    if (directory / "model.safetensors.index.json").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    tensors = spec_from_config(CONFIG).tensors()
    budget = sum(t.dtype.itemsize * torch.Size(t.shape).numel() for t in tensors.values()) / files
    gen = torch.Generator().manual_seed(0)
    groups, size = [[]], 0
    for name, info in tensors.items():
        if size >= budget * len(groups) and len(groups) < files:
            groups.append([])
        groups[-1].append(name)
        size += info.dtype.itemsize * torch.Size(info.shape).numel()
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        data = {n: (torch.randn(tensors[n].shape, generator=gen) * 0.02).to(torch.bfloat16) for n in names}
        save_file(data, str(directory / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, fname)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2))


def bench(directory: Path, tp: int, hf: bool, repeat: int) -> list[dict]:
    """Per-rank medians over ``repeat`` fresh runs: a 2-core VM is noisy, one run can mislead either way."""
    cmd = [sys.executable, "-m", "shardwise.cli", "bench", "load", str(directory), "--tp", str(tp),
           "--dtype", "bfloat16", "--json"] + (["--hf"] if hf else [])
    runs = []
    for _ in range(repeat):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    rows = []
    for per_rank in zip(*runs):
        row = dict(per_rank[0])
        for key in ("load_s", "cpu_s", "floor_s", "hf_load_s", "rss_ratio"):
            if key in row:
                row[key] = statistics.median(r[key] for r in per_rank)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("bench-data/llama-349m"))
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    make_checkpoint(args.dir)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"medians of {args.repeat} runs\n")
    print("| TP | rank | MB loaded | shardwise s | shardwise CPU s | HF tp_plan s | floor s | shardwise/HF "
          "| shardwise/floor | peak RSS growth / shard |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tp in args.tp:
        for r in bench(args.dir, tp, not args.no_hf, args.repeat):
            hf = r.get("hf_load_s")
            hf_s, ratio = (f"{hf:.3f}", f"{r['load_s'] / hf:.3f}") if hf else ("-", "-")
            print(f"| {tp} | {r['rank']} | {r['shard_bytes'] / 1e6:.0f} | {r['load_s']:.3f} | {r['cpu_s']:.3f} | "
                  f"{hf_s} | "
                  f"{r['floor_s']:.3f} | {ratio} | {r['load_s'] / r['floor_s']:.2f} | {r['rss_ratio']:.3f} |")

if __name__ == "__main__":
    main()
