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

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..model.prompts import PromptTables, rank_rows
from ..plan.boxes import Box
from ..plan.rank import RankPlan
from ..plan.spec import ModelSpec
from ..untrusted import UntrustedJSON, parse_json, shown
from .reader import DTYPE_NAMES, Checkpoint, CheckpointError, inside, open_regular
from .writer import save_safetensors

CONFIG, WEIGHTS, KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"
# What shardwise train adds beside a table it trains, for a resume: AdamW's moments of the table and the run's record.
STATE, RECORD = "optimizer.safetensors", "training.json"
TABLE_FILES = (CONFIG, WEIGHTS, STATE, RECORD)
MAX_CONFIG_BYTES = 1 << 20  # a config or record is a few hundred bytes: more is read as truncated JSON, refused


def table_shape(directory: Path, spec: ModelSpec) -> int:
    """The number of virtual tokens of the table in ``directory``, after checking its config and tensor header
    against ``spec``."""
    where = directory / CONFIG
    config = read_json(directory, CONFIG, "PEFT adapter config")
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


def table_task(directory: Path) -> str:
    """The task a table is named for when none is given: the one shardwise train trained it for (its record's),
    else the directory's name."""
    if (directory / RECORD).is_file():
        record = read_json(directory, RECORD, "training record")
        settings = record.get("settings") if isinstance(record, dict) else None
        task = settings.get("task") if isinstance(settings, dict) else None
        if isinstance(task, str) and task:
            return task
    return directory.name


def read_json(directory: Path, name: str, what: str) -> object:
    """The parsed JSON file ``name`` of ``directory`` (a regular file inside it, at most 1 MiB read)."""
    try:
        with os.fdopen(open_regular(inside(directory, name, str(directory))), "rb") as f:
            return parse_json(f.read(MAX_CONFIG_BYTES))
    except (OSError, UntrustedJSON) as e:
        raise CheckpointError(f"{directory / name}: not a readable {what} ({e})") from None


def _checkpoint(directory: Path, file: str = WEIGHTS) -> Checkpoint:
    return Checkpoint(directory, [inside(directory, file, str(directory))])


def read_rows(directory: Path, key: str, rows: tuple[int, int], out: torch.Tensor, file: str = WEIGHTS,
              total: int | None = None) -> None:
    """Rows ``rows`` of ``key`` (in ``file`` of ``directory``) into the first rows of ``out``, reading those bytes
    only; the file's header is validated, and a tensor of another width or too few rows refused (with ``total``,
    a tensor other than ``total`` rows of ``out``'s dtype)."""
    lo, hi = rows
    with _checkpoint(directory, file) as source:
        entry = source.entries.get(key)
        width = out.shape[1]
        if total is None:
            fits, expected = entry is not None and entry.shape[1:] == (width,) and entry.shape[0] >= hi, \
                f"at least {hi} rows of {width}"
        else:
            fits, expected = entry is not None and entry.shape == (total, width) and entry.dtype == out.dtype, \
                f"{DTYPE_NAMES[out.dtype]} [{total}, {width}]"
        if not fits:
            found = "missing" if entry is None else f"{DTYPE_NAMES[entry.dtype]} {list(entry.shape)}"
            raise CheckpointError(f"{directory / file}: tensor {key!r} is {found}, expected {expected}")
        if lo < hi:
            source.read(Box(key, (lo, 0), (hi, out.shape[1]), (0, 0)), out)


def write_table(directory: Path, table: torch.Tensor, config: dict, state: dict[str, torch.Tensor] | None = None,
                record: dict | None = None) -> None:
    """A table in PEFT's prompt-tuning format into ``directory`` (``config`` completes PEFT's adapter config);
    with ``state`` and ``record``, what a resume of its training needs beside it."""
    (directory / CONFIG).write_text(json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                                                "num_virtual_tokens": table.shape[0], "token_dim": table.shape[1],
                                                "num_transformer_submodules": 1, "inference_mode": True} | config,
                                               indent=2))
    save_safetensors({KEY: table.contiguous()}, directory / WEIGHTS)
    if state is not None:
        save_safetensors({k: t.contiguous() for k, t in state.items()}, directory / STATE)
    if record is not None:
        (directory / RECORD).write_text(json.dumps(record, indent=2))


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
    lo, hi = rank_rows(plan, at)
    if not plan.is_first:
        lo = hi = 0
    spec = plan.spec
    local = torch.zeros(max(hi - lo, 1), spec.hidden, dtype=dtype)
    for task, directory in tables.items():
        start, length = tasks[task]
        a, b = max(lo, start), min(hi, start + length)  # this rank's rows of this table
        if a < b:
            read_rows(Path(directory), KEY, (a - start, b - start), local[a - lo:])
    return PromptTables(tasks, (lo, hi), local.to(device))
