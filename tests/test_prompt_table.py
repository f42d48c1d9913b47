"""Prompt-learning tables: PEFT prompt-tuning adapters, prepended as PEFT prepends them, under TP and PP.

The reference is PEFT's ``PeftModel`` on HF's model with the same table. PEFT ignores position ids in prompt
learning, so its left-padded rows count the padding as positions; shardwise gives each row of a ragged batch what
it gets alone, which is what PEFT gives that row alone (checked so).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from prompt_workers import with_tables

from shardwise import Layout, launch
from shardwise.io.prompt_table import load_tables, table_shape
from shardwise.io.reader import CheckpointError

peft = pytest.importorskip("peft")

NAMES = ["llama-untied", "qwen3-tied"]
LAYOUTS = [Layout(), Layout(tp=2), Layout(pp=2)]
LENGTHS = {"a": 5, "b": 3}  # virtual tokens per task
IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
RAGGED = [[5, 9, 17, 33, 2, 8], [40, 3, 11]]
STEPS = 8


def peft_model(path: Path, table: Path | None = None, length: int = 5, seed: int = 0):
    """PEFT's prompt tuning on HF's fp32 model: the table at ``table`` or a new random one (seeded)."""
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if table is not None:
        return peft.PeftModel.from_pretrained(base, table).eval()
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(
            torch.randn(length, base.config.hidden_size, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def greedy(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                              max_new_tokens=STEPS, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def tables(checkpoints, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Two tables per checkpoint, saved by PEFT."""
    root = tmp_path_factory.mktemp("tables")
    out = {}
    for name in NAMES:
        out[name] = {}
        for seed, (task, length) in enumerate(LENGTHS.items()):
            peft_model(checkpoints[name], length=length, seed=seed).save_pretrained(root / name / task)
            out[name][task] = str(root / name / task)
    return out


@pytest.fixture(scope="module")
def peft_refs(checkpoints, tables) -> dict[str, dict]:
    """PEFT's logits and tokens for the batch, and each ragged row alone with each task."""
    out = {}
    for name in NAMES:
        models = {task: peft_model(checkpoints[name], Path(tables[name][task])) for task in LENGTHS}
        with torch.no_grad():
            logits = models["a"](input_ids=IDS).logits
        alone = {(task, i): greedy(models[task], torch.tensor([row]))[0] for task in LENGTHS
                 for i, row in enumerate(RAGGED)}
        out[name] = {"logits": logits, "batch": greedy(models["a"], IDS), "alone": alone}
    return out


@pytest.fixture(scope="module")
def runs(checkpoints, tables) -> dict:
    return {(layout, name): launch(with_tables, layout.world_size, layout, str(checkpoints[name]), tables[name], IDS,
                                   RAGGED, STEPS) for layout in LAYOUTS for name in NAMES}


def _row(out: torch.Tensor, i: int, prompt: list[int]) -> list[int]:
    """Row ``i`` of a left-padded batch's result without its padding."""
    width = max(len(r) for r in RAGGED)
    return out[i, width - len(prompt):].tolist()


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_tokens_equal_pefts(runs, peft_refs, name, layout):
    got, want = runs[layout, name], peft_refs[name]
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=2e-5)
    assert torch.equal(got["batch"], want["batch"]), (got["batch"], want["batch"])


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_each_row_of_a_ragged_or_mixed_batch_gets_what_peft_gives_it_alone(runs, peft_refs, name, layout):
    """Left-padded prompts with one task, and with a task per row (tables of 5 and 3 virtual tokens)."""
    got, alone = runs[layout, name], peft_refs[name]["alone"]
    for i, prompt in enumerate(RAGGED):
        for key, task in (("ragged", "a"), ("mixed", "ab"[i])):
            want = alone[task, i].tolist()  # PEFT stops at the model's EOS; shardwise was given none to stop at
            assert _row(got[key], i, prompt)[: len(want)] == want, (key, i)


def test_each_tp_rank_holds_its_rows_of_the_tables(checkpoints, tables):
    """Under TP 2 the stack of tables (5 + 3 rows) is split as the embedding's vocabulary is: 4 and 4 rows."""
    from shardwise import load_spec, plan_rank

    spec = load_spec(checkpoints["llama-untied"])
    stacked = torch.cat([peft_model(checkpoints["llama-untied"], Path(tables["llama-untied"][t]))
                         .prompt_encoder["default"].embedding.weight.detach() for t in LENGTHS])
    for rank in range(2):
        got = load_tables(tables["llama-untied"], plan_rank(spec, Layout(tp=2), rank), torch.float32)
        assert got.tasks == {"a": (0, 5), "b": (5, 3)} and got.rows == ((0, 4), (4, 8))[rank]
        assert torch.equal(got.local, stacked[got.rows[0]: got.rows[1]])


def test_tables_are_checked_before_use(checkpoints, tables, tmp_path):
    """A table of the wrong width, another PEFT method, a weights file that is a symlink out of the directory, and
    a config that is a FIFO are refused, each naming the file and what was expected."""
    from shardwise import load_spec

    spec = load_spec(checkpoints["llama-untied"])
    other = load_spec(checkpoints["qwen3-tied"])
    if other.hidden != spec.hidden:
        with pytest.raises(CheckpointError, match=r"prompt_embeddings.*expected a float tensor of \[5, "):
            table_shape(Path(tables["qwen3-tied"]["a"]), spec)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match="adapter_config.json: peft_type is str 'LORA', expected 'PROMPT_TUNING'"):
        table_shape(lora, spec)
    escaped = tmp_path / "escaped"
    escaped.mkdir()
    (escaped / "adapter_config.json").write_bytes((Path(tables["llama-untied"]["a"]) / "adapter_config.json")
                                                  .read_bytes())
    (escaped / "adapter_model.safetensors").symlink_to(Path(tables["llama-untied"]["a"]) / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="leads outside"):
        table_shape(escaped, spec)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "adapter_config.json")  # would block a plain read forever
    with pytest.raises(CheckpointError, match="adapter_config.json: is not a regular file"):
        table_shape(fifo, spec)


def test_generate_refuses_an_unknown_task(checkpoints, tables):
    from shardwise import load_model

    with load_model(checkpoints["llama-untied"], progress=False, prompt_tables=tables["llama-untied"]) as model:
        with pytest.raises(ValueError, match="unknown task 'c' \\(prompt tables: a, b\\)"):
            model.generate(IDS, 2, task="c")
        with pytest.raises(ValueError, match="3 tasks for a batch of 2"):
            model.generate(IDS, 2, task=["a", "b", "a"])


def test_a_table_shorter_than_the_tp_degree_leaves_a_rank_without_rows(checkpoints, tmp_path):
    """One virtual token at TP 2: rank 1 holds no row of it, joins the lookup all the same, and the tokens equal
    TP 1's."""
    table = tmp_path / "one"
    peft_model(checkpoints["llama-untied"], length=1, seed=7).save_pretrained(table)
    got = {tp: launch(_one_token_task, tp, str(checkpoints["llama-untied"]), str(table), tp) for tp in (1, 2)}
    assert torch.equal(got[1], got[2])


def _one_token_task(path: str, table: str, tp: int) -> torch.Tensor:
    from shardwise import load_model

    with load_model(path, Layout(tp=tp), progress=False, prompt_tables={"one": table}) as model:
        return model.generate(IDS, STEPS, task="one")
