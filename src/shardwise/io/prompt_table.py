"""Prompt-learning tables: per task, virtual-token embeddings that a prompt starts with.

A table is PEFT's prompt-tuning adapter (``adapter_config.json`` with ``peft_type``
``PROMPT_TUNING``, ``adapter_model.safetensors`` holding ``prompt_embeddings``, one row of
the model's hidden size per virtual token), loaded under a task name. All of a model's
tables are one stack of rows; task ``k``'s virtual tokens are the ids ``vocab + start_k``
onwards, so a batch can mix tasks (FasterTransformer's ``request_prompt_type``) and the
lookup is the embedding's own: under TP each rank holds its share of the stack's rows, as
it holds its share of the vocabulary, and reads only those bytes.

Both files are untrusted: the config is parsed and type-checked, the tensor's header
validated, its shape checked against the model before a byte of it is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..model.prompts import PromptTables
from ..plan.boxes import Box, split_evenly
from ..plan.rank import RankPlan
from ..plan.spec import ModelSpec
from ..untrusted import UntrustedJSON, parse_json, shown
from .reader import DTYPE_NAMES, Checkpoint, CheckpointError, inside, open_regular

CONFIG, WEIGHTS, KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"
MAX_CONFIG_BYTES = 1 << 20  # an adapter config is a few hundred bytes: more is read as truncated JSON, refused


def table_shape(directory: Path, spec: ModelSpec) -> int:
    """The number of virtual tokens of the table in ``directory``, after checking its config and tensor header
    against ``spec``."""
    where = directory / CONFIG
    try:
        with os.fdopen(open_regular(inside(directory, CONFIG, str(directory))), "rb") as f:
            config = parse_json(f.read(MAX_CONFIG_BYTES))
    except (OSError, UntrustedJSON) as e:
        raise CheckpointError(f"{where}: not a readable PEFT adapter config ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise CheckpointError(f"{where}: peft_type is {shown(found)}, expected 'PROMPT_TUNING'")
    virtual, modules = config.get("num_virtual_tokens"), config.get("num_transformer_submodules", 1)
    if not isinstance(virtual, int) or isinstance(virtual, bool) or virtual < 1 or modules not in (1, None):
        raise CheckpointError(f"{where}: num_virtual_tokens {shown(virtual)} and num_transformer_submodules "
                              f"{shown(modules)}: expected a positive count and 1 (a decoder)")
    entry = _checkpoint(directory).entries.get(KEY)
    if entry is None:
        raise CheckpointError(f"{directory / WEIGHTS}: tensor {KEY!r} is missing")
    if entry.shape != (virtual, spec.hidden) or not entry.dtype.is_floating_point:
        raise CheckpointError(f"{entry.path}: tensor {KEY!r} is {DTYPE_NAMES[entry.dtype]} {list(entry.shape)}, "
                              f"expected a float "
                              f"tensor of [{virtual}, {spec.hidden}] (num_virtual_tokens x the model's hidden size)")
    return virtual


def _checkpoint(directory: Path) -> Checkpoint:
    return Checkpoint(directory, [inside(directory, WEIGHTS, str(directory))])


def load_tables(tables: Mapping[str, str | Path], plan: RankPlan, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> PromptTables:
    """Every task's table checked, stacked in the given order, and this rank's rows of the stack read: its TP share
    where the plan splits the embedding, all of them where it replicates it, none off the first pipeline stage. A
    rank whose share is empty (fewer rows than TP ranks) holds one zero row, which its lookup never selects, so it
    joins the lookup's all-reduce like the others."""
    tasks, at = {}, 0
    for task, directory in tables.items():
        length = table_shape(Path(directory), plan.spec)
        tasks[task], at = (at, length), at + length
    split = plan.styles["embed"] != "replicated"
    lo, hi = split_evenly(at, plan.layout.tp)[plan.tp_rank] if split else (0, at)
    if not plan.is_first:
        lo = hi = 0
    spec = plan.spec
    local = torch.zeros(max(hi - lo, 1), spec.hidden, dtype=dtype)
    for task, directory in tables.items():
        start, length = tasks[task]
        a, b = max(lo, start), min(hi, start + length)  # this rank's rows of this table
        if a < b:
            with _checkpoint(Path(directory)) as source:
                source.read(Box(KEY, (a - start, 0), (b - start, spec.hidden), (a - lo, 0)), local)
    return PromptTables(tasks, (lo, hi), local.to(device))
