"""Prompt tuning: a new prompt table trained before a frozen model, against PEFT's prompt tuning.

The reference is PEFT's ``get_peft_model`` with a ``PromptTuningConfig`` on HF's fp32 model, its table started from
the same embedding rows, trained by ``torch.optim.AdamW`` with ``clip_grad_norm_`` on the same batches, in this
process. shardwise trains through ``train_rank`` (what ``shardwise train --train prompt-table`` runs on every rank)
at TP 1, TP 2 (rows split unevenly, and a table shorter than the TP degree), and frozen ZeRO-3 over DP 2; its saves
are PEFT adapters that PEFT loads, and a run resumed under another layout ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import prompt_tuning_workers as ptw
import pytest
import torch
from conftest import VOCAB
from forked_python import run as python_run
from shared_launch import SharedLaunches
from test_cli import NO_SPAWN
from test_train_cli import _with_tokenizer

from shardwise import Layout
from shardwise.io.prompt_table import CONFIG, KEY, WEIGHTS, table_task
from shardwise.io.reader import CheckpointError, read_header
from shardwise.train.prompt_tuning import init_ids, read_record

peft = pytest.importorskip("peft")

NAMES = ["llama-untied", "qwen3-tied"]
STEPS, VIRTUAL = 8, 5
RUNS = {  # name -> (layout, provider, virtual tokens)
    "tp1": (Layout(), "resident", VIRTUAL),
    "tp2": (Layout(tp=2), "resident", VIRTUAL),  # rows 3 + 2
    "tp2-short": (Layout(tp=2), "resident", 1),  # one rank holds no row of the table
    "zero3-dp2": (Layout(dp=2), "zero3", VIRTUAL),
}


def peft_run(path: Path, virtual: int, batch: int = ptw.BATCH) -> dict:
    """PEFT's prompt tuning of HF's fp32 model: the losses and the table after each step."""
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual))
    table = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(base.get_input_embeddings().weight[init_ids(virtual, VOCAB, seed=ptw.SEED)])
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained == [table]
    opt = torch.optim.AdamW(trained, lr=ptw.HYPER["lr"], weight_decay=ptw.HYPER["weight_decay"])
    losses, norms, tables, stream = [], [], [], ptw.stream(batch)
    for step in range(1, STEPS + 1):
        ids = stream.global_batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(trained, ptw.HYPER["clip"])))
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        tables.append(table.detach().clone())
    return {"losses": losses, "norms": norms, "tables": tables}


@pytest.fixture(scope="module")
def refs(checkpoints) -> dict:
    return {(name, v): peft_run(checkpoints[name], v) for name in NAMES for v in {r[2] for r in RUNS.values()}}


MOE = "qwen3_moe-untied"


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tables")


@pytest.fixture(scope="module")
def runs(checkpoints, moe_checkpoints, saves) -> SharedLaunches:
    # a mixture of experts at EP 2 on one window a step: the EP rank without rows still joins every exchange
    jobs = {(MOE, "ep2"): (2, ptw.tune, (str(moe_checkpoints[MOE]), Layout(ep=2), "resident", VIRTUAL, STEPS,
                                         str(saves / MOE), None, 1))}
    for name in NAMES:
        path = str(checkpoints[name])
        for run, (layout, provider, virtual) in RUNS.items():
            jobs[name, run] = (layout.world_size, ptw.tune,
                               (path, layout, provider, virtual, STEPS, str(saves / name / run)))
        # half the steps at TP 2, the rest resumed from that save by frozen ZeRO-3 over DP 2, into itself
        half = str(saves / name / "resumed")
        jobs[name, "half"] = (2, ptw.tune, (path, Layout(tp=2), "resident", VIRTUAL, STEPS // 2, half))
        jobs[name, "resumed"] = (2, ptw.tune, (path, Layout(dp=2), "zero3", VIRTUAL, STEPS, half, half))
        for provider, layout in (("resident", Layout(tp=2)), ("zero3", Layout(dp=2))):
            jobs[name, "frozen", provider] = (2, ptw.frozen, (path, layout, provider, VIRTUAL))
    return SharedLaunches(jobs, timeout=600)


def saved_table(directory: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(directory / WEIGHTS)[KEY]


def close(found: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = float((found - expected).abs().max() / expected.abs().max())
    assert err <= 1e-5, f"{what}: the table is {err:.2e} of its max |value| from PEFT's"


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("name", NAMES)
def test_prompt_tuning_matches_peft(runs, refs, saves, name, run):
    """8 steps: the loss of the first and last step and the saved table equal PEFT's within 1e-5 relative, the
    table moved far more than that, and clipping acted on every step."""
    virtual = RUNS[run][2]
    ref = refs[name, virtual]
    result = runs.result((name, run))[0]
    assert result["virtual"] == virtual and result["first_step"] == 1
    for found, expected in ((result["first_loss"], ref["losses"][0]), (result["last_loss"], ref["losses"][-1])):
        assert abs(found - expected) <= 1e-5 * abs(expected), f"loss {found} vs PEFT's {expected}"
    assert ref["losses"][-1] < ref["losses"][0]
    assert min(ref["norms"]) > ptw.HYPER["clip"], ref["norms"]
    close(saved_table(saves / name / run), ref["tables"][-1], f"{name} {run}")
    moved = float((ref["tables"][-1] - ref["tables"][0]).abs().max() / ref["tables"][-1].abs().max())
    assert moved > 1e-2, moved


def test_a_frozen_mixture_of_experts_with_a_rank_without_rows_matches_peft(runs, moe_checkpoints, saves):
    ref = peft_run(moe_checkpoints[MOE], VIRTUAL, batch=1)
    result = runs.result((MOE, "ep2"))[0]
    assert abs(result["last_loss"] - ref["losses"][-1]) <= 1e-5 * ref["losses"][-1]
    close(saved_table(saves / MOE), ref["tables"][-1], f"{MOE} ep2")


@pytest.mark.parametrize("name", NAMES)
def test_a_resumed_run_under_another_layout_ends_where_peft_does(runs, refs, saves, name):
    half, resumed = runs.result((name, "half"))[0], runs.result((name, "resumed"))[0]
    assert (half["steps"], resumed["first_step"]) == (STEPS // 2, STEPS // 2 + 1)
    ref = refs[name, VIRTUAL]
    assert abs(resumed["last_loss"] - ref["losses"][-1]) <= 1e-5 * ref["losses"][-1]
    directory = saves / name / "resumed"
    close(saved_table(directory), ref["tables"][-1], f"{name} resumed")
    assert read_record(directory).step == STEPS
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "training.json"])


@pytest.mark.parametrize("provider", ["resident", "zero3"])
@pytest.mark.parametrize("name", NAMES)
def test_the_model_stays_frozen(runs, name, provider):
    """Two steps change the table and no weight; no weight has a gradient, and the training holds the table, its
    gradient and its two moments alone."""
    for rank, out in enumerate(runs.result((name, "frozen", provider))):
        assert out["moved"] and out["changed"] == [] and out["grads"] == [], f"rank {rank}: {out}"
        lo, hi = out["rows"]
        table = max(hi - lo, 1) * out["hidden"] * 4  # fp32
        assert out["nbytes"] == {"table": table, "gradients": table, "moments": 2 * table}, out


def test_peft_loads_the_save_and_generate_names_it_by_its_task(runs, saves, checkpoints):
    """PEFT's own loader takes the saved adapter as it is, with the trained table; a bare --prompt-table DIR gets the
    task it was trained for."""
    import transformers

    directory = saves / "llama-untied" / "tp2"
    runs.result(("llama-untied", "tp2"))
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama-untied"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, directory)
    assert torch.equal(model.prompt_encoder["default"].embedding.weight.detach(), saved_table(directory))
    config = json.loads((directory / CONFIG).read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == VIRTUAL
    assert read_header(directory / WEIGHTS)[KEY].dtype == torch.float32
    assert table_task(directory) == ptw.TASK


def test_a_table_starts_from_the_embedding_rows_of_its_ids(checkpoints):
    from shardwise import load_model
    from shardwise.train.prompt_tuning import PromptTuning

    assert init_ids(5, VOCAB, [7, 8]) == [7, 8, 7, 8, 7] and init_ids(2, VOCAB, [7, 8, 9]) == [7, 8]
    assert init_ids(4, VOCAB, seed=1) == init_ids(4, VOCAB, seed=1) != init_ids(4, VOCAB, seed=2)
    with load_model(checkpoints["qwen3-tied"], dtype=torch.float32, progress=False) as model:
        tuning = PromptTuning.start(model, "t", [3, 1, 4])
        assert torch.equal(tuning.table.detach(), model.provider.tensors["embed"][[3, 1, 4]])
        assert model.prompts.ids("t", VOCAB).tolist() == [VOCAB, VOCAB + 1, VOCAB + 2]


@pytest.fixture(scope="module")
def with_tokenizer(checkpoints, tmp_path_factory) -> Path:
    return _with_tokenizer(checkpoints["llama-untied"], tmp_path_factory.mktemp("cli") / "ckpt")


@pytest.mark.parametrize("args,error", [
    ([], "--train prompt-table needs --virtual-tokens N"),
    (["--virtual-tokens", "4", "--init-text", ""], "--init-text '': no tokens"),
    (["--virtual-tokens", "4", "--resume", "{table}"], "its table has 5 virtual tokens, not --virtual-tokens 4"),
    (["--init-text", "t3", "--resume", "{table}"], "--init-text starts a new table; --resume"),
    (["--resume", "{checkpoint}"], "no training.json: not a prompt table that shardwise train saved"),
])
def test_refusals_before_any_rank_starts(with_tokenizer, runs, saves, tmp_path, args, error):
    runs.result(("llama-untied", "tp1"))
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"t{i % 100}" for i in range(300)))
    table = saves / "llama-untied" / "tp1"
    argv = ["train", str(with_tokenizer), "--train", "prompt-table", "--data", str(data), "--steps", "9", "--seq",
            "8", "--batch", "4", "--seed", str(ptw.SEED), "--save", str(tmp_path / "out")]
    argv += [a.format(table=table, checkpoint=with_tokenizer) for a in args]
    out = python_run([sys.executable, "-c", NO_SPAWN, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "SPAWNED" not in out.stderr, out.stderr
    assert error in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_weight_training_refuses_prompt_flags(with_tokenizer, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"t{i % 100}" for i in range(300)))
    argv = ["train", str(with_tokenizer), "--data", str(data), "--steps", "2", "--seq", "8", "--batch", "4",
            "--virtual-tokens", "3", "--save", str(tmp_path / "out")]
    out = python_run([sys.executable, "-c", NO_SPAWN, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--virtual-tokens goes with --train prompt-table" in out.stderr, out.stderr


def test_a_forged_record_or_state_is_refused(saves, runs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from shardwise.io.prompt_table import STATE
    from shardwise.train.prompt_tuning import read_state

    runs.result(("llama-untied", "tp1"))
    forged = Path(shutil.copytree(saves / "llama-untied" / "tp1", tmp_path / "t"))
    (forged / "training.json").write_text(json.dumps({"step": "3", "data": {}}))
    with pytest.raises(CheckpointError, match="training.json: field 'step' is str '3', expected an integer >= 1"):
        read_record(forged)
    state = load_file(forged / STATE)
    hidden = state["exp_avg"].shape[1]
    for key, value, error in [("exp_avg_sq", -state["exp_avg_sq"] - 1, "'exp_avg_sq' rows 0..5 hold negative"),
                              ("exp_avg", state["exp_avg"] / 0, "'exp_avg' rows 0..5 hold non-finite"),
                              ("exp_avg", state["exp_avg"].double(), r"'exp_avg' is F64 \[5, \d+\], expected F32"),
                              ("exp_avg", state["exp_avg"][:4], r"'exp_avg' is F32 \[4, \d+\], expected F32 \[5")]:
        save_file(state | {key: value.contiguous()}, forged / STATE)
        with pytest.raises(CheckpointError, match=error):
            read_state(forged, (0, VIRTUAL), VIRTUAL, hidden)


def test_a_save_replaces_only_its_own_kind(saves, runs, checkpoints):
    from shardwise.io.publish import TargetError, check_target

    runs.result(("llama-untied", "tp1"))
    table = saves / "llama-untied" / "tp1"
    assert check_target(table, overwrite=True, kind="table") == "replace"
    with pytest.raises(TargetError, match="holds a prompt table that shardwise train saved, and this writes a model"):
        check_target(table, overwrite=True)
    with pytest.raises(TargetError, match="holds a model checkpoint, and this writes a prompt table"):
        check_target(checkpoints["llama-untied"], overwrite=True, kind="table")
