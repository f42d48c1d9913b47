"""Rank-side half of tests/test_table.py: the architecture table with one entry added, in every process."""

from __future__ import annotations

from dataclasses import replace

import torch
import train_workers as tw

from shardwise import Layout, export, load_model
from shardwise.plan.archs import ARCHS, Kind, L, Part

O_BIAS = Kind("o_bias", (Part(f"{L}.self_attn.o_proj.bias", ("hidden",)),), init="zeros", report="attention",
              when="o_bias")
"""The entry the test adds: a bias on o_proj, held where config.json's ``attention_bias`` says."""


def drop_o_bias(arch: str = "llama") -> None:
    """The table without its o_proj bias entry: the state before the entry was written."""
    table = ARCHS[arch]
    ARCHS[arch] = replace(table, layer=tuple(k for k in table.layer if k.local != "o_bias"))


def add_o_bias(arch: str = "llama") -> None:
    """The table edit, and nothing else: the layer's kinds without any o_proj bias, plus ``O_BIAS``."""
    drop_o_bias(arch)
    ARCHS[arch] = replace(ARCHS[arch], layer=ARCHS[arch].layer + (O_BIAS,))


def run_with_o_bias(path: str, ids: torch.Tensor, steps: int, out: str, tp: int, expected: tw.Expected) -> dict:
    """Under the edited table: logits and greedy tokens, an export of the loaded weights, and 8 training steps
    against HF's (``expected``)."""
    add_o_bias()
    with load_model(path, Layout(tp), progress=False) as model:
        result = {"logits": model(ids), "tokens": model.generate(ids, steps)}
        export(model, out, progress=False)
    result["train"] = tw.train(path, tp, 1, "zero3" if tp > 1 else "resident", expected=expected)
    return result
