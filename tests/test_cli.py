"""The command line: plan, bench load, generate (spawned and under torchrun)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPT, VOCAB
from forked_python import run as python_run

from shardwise import Layout, load_spec, plan_rank

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shardwise(*args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    if torchrun:
        port = f"--master-port={_free_port()}"
        cmd = [str(BIN / "torchrun"), f"--nproc-per-node={torchrun}", port, "-m", "shardwise.cli", *args]
    else:
        cmd = [sys.executable, "-m", "shardwise.cli", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    return python_run(cmd, capture_output=True, text=True, timeout=180, env=env, check=False)


@pytest.fixture(scope="module")
def with_tokenizer(checkpoints, tmp_path_factory) -> Path:
    """A tiny checkpoint plus a word-level tokenizer whose tokens are the words t0..t130."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(shutil.copytree(checkpoints["qwen2-untied"], tmp_path_factory.mktemp("tok") / "ckpt"))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.mark.parametrize("name", ["llama-untied", "phi3-untied", "olmo2-untied"])
def test_plan_table(checkpoints, name):
    """Each rank's bytes: the total, and the attention and MLP columns as its heads and ffn range make them (Phi-3's
    packed projections count only the rank's rows of them)."""
    path = checkpoints[name]
    out = shardwise("plan", str(path / "config.json"), "--tp", "3", "--pp", "2")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    assert len(rows) == 6
    spec = load_spec(path)
    h, d, size = spec.hidden, spec.head_dim, spec.dtype.itemsize
    for rank, row in enumerate(rows):
        plan = plan_rank(spec, Layout(3, 2), rank)
        assert float(row[-2]) == pytest.approx(plan.nbytes(spec.dtype) / 1e6, abs=0.01)
        q, kv, ffn = plan.heads.n_q * d, plan.heads.n_kv * d, plan.ffn[1] - plan.ffn[0]
        attention = (q + 2 * kv) * (h + spec.qkv_bias) + h * q + h * spec.o_bias
        mlp = 3 * ffn * h
        mb = [float(x) for x in row[6::2]]  # embedding, attention, mlp, norms, lm_head, total
        assert mb[1:3] == pytest.approx([len(plan.layers) * n * size / 1e6 for n in (attention, mlp)], abs=0.01)


def test_bench_load_json(checkpoints):
    """One row per rank, then (``--cold``) the slower rank's cold load beside the mean of the two sequential cold
    reads that bracket it, or why the pages could not be dropped."""
    out = shardwise("bench", "load", str(checkpoints["mistral-untied"]), "--tp", "2", "--json", "--cold")
    assert out.returncode == 0, out.stderr
    *rows, cold = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["load_s"] > 0 and r["bytes"] > 0 and r["peak_rss_growth"] >= 0 and r["floor_s"] > 0
    assert cold["cold_load_s"] == max(r["load_s"] for r in rows) and cold["sequential_read_s"] > 0
    before, after = cold["sequential_reads_s"]
    assert before > 0 and after > 0 and cold["sequential_read_s"] == pytest.approx((before + after) / 2)
    assert cold["cold_over_sequential"] == cold["cold_load_s"] / cold["sequential_read_s"]
    assert isinstance(cold.get("not_cold", ""), str)


def test_bench_export_json(checkpoints, tmp_path):
    """The export from TP 2 beside its floors: one rank writing every byte, and every rank its share at once."""
    out = shardwise("bench", "export", str(checkpoints["mistral-untied"]), "--tp", "2", "--json",
                    "--work-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["bytes"] > 0 and all(row[k] > 0 for k in ("export_s", "sequential_write_s", "parallel_write_s"))
    assert list(tmp_path.iterdir()) == []  # the bench's work directory is gone with every file in it


def _expected_text(path: Path, prompt_ids: list[int], steps: int) -> str:
    from shardwise import load_model

    out = load_model(path, progress=False).generate(torch.tensor([prompt_ids]), steps)
    return " ".join(f"t{i}" for i in out[0, len(prompt_ids) :].tolist())


@pytest.mark.parametrize("torchrun", [0, 2])
def test_generate(with_tokenizer, torchrun):
    ids = PROMPT[0].tolist()
    prompt = " ".join(f"t{i}" for i in ids)
    out = shardwise("generate", str(with_tokenizer), "--tp", "2", "--prompt", prompt, "--max-new-tokens", "6",
                    torchrun=torchrun)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _expected_text(with_tokenizer, ids, 6)
    assert "tok/s" in out.stderr and "load" in out.stderr
    assert re.search(r"^\[shardwise\] rank 0 loading \d+ boxes in [\d.]+s$", out.stderr, re.M), out.stderr


def test_generate_rejects_world_mismatch_under_torchrun(with_tokenizer):
    out = shardwise("generate", str(with_tokenizer), "--tp", "3", "--prompt", "t1", torchrun=2)
    assert out.returncode != 0 and "torchrun started 2" in out.stderr


def test_cli_error_is_one_line_naming_rank_file_and_tensor(with_tokenizer, tmp_path):
    bad = Path(shutil.copytree(with_tokenizer, tmp_path / "bad"))
    victim = sorted(bad.glob("model-*.safetensors"))[3]
    victim.write_bytes(victim.read_bytes()[:-8])
    out = shardwise("generate", str(bad), "--tp", "2", "--prompt", "t1")
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("shardwise:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"{victim.name}: tensor '" in lines[0] and "truncated" in lines[0] and "rank " in lines[0]


NO_SPAWN = ("import importlib, pkgutil, sys, shardwise.cli as cli\n"
            "for m in pkgutil.iter_modules(cli.__path__):  # each command module launches its own ranks\n"
            "    command = importlib.import_module(f'shardwise.cli.{m.name}')\n"
            "    if hasattr(command, 'launch'):\n"
            "        command.launch = lambda *a, **k: sys.exit('SPAWNED')\n"
            "cli.main(sys.argv[1:])")


@pytest.mark.parametrize("args,error", [
    (["generate", "{llama}", "--tp", "10", "--prompt", "t1"], "LayoutError: tp=10 exceeds the 9 query heads"),
    (["generate", "{llama}", "--tp", "0", "--prompt", "t1"], "argument --tp: 0 must be >= 1"),
    (["generate", "{llama}", "--pp", "-1", "--prompt", "t1"], "argument --pp: -1 must be >= 1"),
    (["generate", "{llama}", "--tp", "x", "--prompt", "t1"], "argument --tp: 'x' is not an integer"),
    (["generate", "{tok}", "--prompt", ""], "prompt 1 ('') has no tokens"),
    (["generate", "{tok}", "--prompt", "t1", "--prompt", " "], "prompt 2 (' ') has no tokens"),
    (["generate", "{tok}", "--prompt", "t1", "--device", "bogus"], "--device 'bogus'"),
    (["generate", "{tok}", "--prompt", "t1", "--temperature", "nan"], "'nan' is not a finite number"),
    (["generate", "{tok}", "--prompt", "t1", "--seed", "1" + "0" * 20], "must be >= 0 and <= 9223372036854775807"),
    (["generate", "{tok}", "--prompt", "t1", "--max-new-tokens", "100000000000"], "lower --max-new-tokens"),
    (["generate", "{tok}"], "no prompt: give --prompt TEXT (repeatable) or --prompts FILE"),
    (["generate", "{tok}", "--prompt", "t1", "--max-new-tokens", "-5"], "argument --max-new-tokens: -5 must be >= 1"),
    (["generate", "{tok}", "--prompt", "t1", "--top-k", "0"], "argument --top-k: 0 must be >= 1"),
    (["generate", "{tok}", "--prompt", "t1", "--top-p", "1.5"], "argument --top-p: 1.5 must be > 0.0 and <= 1.0"),
    (["generate", "{tok}", "--prompt", "t1", "--temperature", "-1"], "argument --temperature: -1 must be >= 0.0"),
    (["reshard", "{llama}", "{tmp}/out", "--tp", "0"], "argument --tp: 0 must be >= 1"),
    (["reshard", "{llama}", "{tmp}/out", "--pp", "4"], "LayoutError: pp=4 exceeds the 3 layers"),
    (["export", "{llama}", "{tmp}/out"], "export takes a sharded checkpoint"),
    (["generate", "{tok}/config.json", "--prompt", "t1"], "config.json: is a file; give the checkpoint directory, "
                                                          "not a file"),
    (["export", "{llama}/config.json", "{tmp}/out"], "config.json: is a file; give the checkpoint directory"),
    (["reshard", "{tok}/tokenizer.json", "{tmp}/out"], "tokenizer.json: is a file; give the checkpoint directory"),
    (["generate", "{tok}", "--prompt", "t1", "--offload"], "--work-dtype and --offload need --provider zero3"),
])
def test_bad_arguments_are_one_line_errors_before_any_rank_starts(checkpoints, with_tokenizer, tmp_path, args, error):
    names = {"llama": checkpoints["llama-untied"], "tok": with_tokenizer, "tmp": tmp_path}
    argv = [a.format(**names) for a in args]
    out = python_run([sys.executable, "-c", NO_SPAWN, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "SPAWNED" not in out.stderr, out.stderr
    assert error in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not out.stderr.splitlines()[-1].startswith("shardwise: rank "), "an error no rank caused names a rank"


def test_cuda_without_a_gpu_is_refused_before_spawning(with_tokenizer):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = python_run([sys.executable, "-c", NO_SPAWN, "generate", str(with_tokenizer), "--prompt", "t1",
                      "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--device cuda needs 1 GPU, this machine has 0" in out.stderr, out.stderr


def test_version_help_defaults_and_verbose_anywhere(checkpoints):
    import shardwise

    out = shardwise_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"shardwise {shardwise.__version__}"
    help_text = " ".join(shardwise_cli("generate", "--help").stdout.split())
    assert "(default: 64)" in help_text and "(default: float32)" in help_text and "None" not in help_text
    out = shardwise_cli("plan", str(checkpoints["llama-tied"]), "--tp", "2", "-v")
    assert out.returncode == 0, out.stderr
    assert "float32" in out.stdout.splitlines()[0], "plan should assume the dtype generate holds"


def test_warnings_for_options_without_effect(with_tokenizer):
    out = python_run([sys.executable, "-c", NO_SPAWN, "generate", str(with_tokenizer), "--prompt", "t1",
                      "--top-k", "5", "--max-new-tokens", "100"], capture_output=True, text=True, timeout=120)
    assert "--top-k/--top-p have no effect without --temperature" in out.stderr, out.stderr
    assert "run past the model's 64 positions" in out.stderr, out.stderr


def shardwise_cli(*args: str) -> subprocess.CompletedProcess:
    return python_run([sys.executable, "-m", "shardwise.cli", *args], capture_output=True, text=True, timeout=120)


def test_generate_a_batch_of_prompts_of_different_lengths(with_tokenizer, tmp_path):
    """Answers are labelled with their prompt's line in the file, blank lines counted."""
    prompts = [PROMPT[0, :3].tolist(), PROMPT[1].tolist()]
    (tmp_path / "prompts.txt").write_text("\n".join(["", *(" ".join(f"t{i}" for i in p) + "\n  " for p in prompts)]))
    out = shardwise("generate", str(with_tokenizer), "--tp", "2", "--max-new-tokens", "6",
                    "--prompts", str(tmp_path / "prompts.txt"))
    assert out.returncode == 0, out.stderr
    expected = [f"[{line}] {_expected_text(with_tokenizer, ids, 6)}" for line, ids in zip((2, 4), prompts)]
    assert sorted(out.stdout.strip().splitlines()) == expected  # each prints as it completes, in any order


def test_answers_of_prompt_and_prompts_file_are_labelled_apart(tmp_path):
    from shardwise.cli.generate import _prompts

    (tmp_path / "p.txt").write_text("a\n\n  \nb\n")
    args = argparse.Namespace(prompt=["x", "y"], prompts_file=str(tmp_path / "p.txt"))
    assert _prompts(args) == (("x", "y", "a", "b"), ("1", "2", f"{tmp_path}/p.txt:1", f"{tmp_path}/p.txt:4"))
    assert _prompts(argparse.Namespace(prompt=None, prompts_file=str(tmp_path / "p.txt"))) == (("a", "b"), ("1", "4"))


def test_batch_answers_are_printed_labelled_as_each_completes():
    import io

    from shardwise.model.text import LabelledAnswers

    class Words:  # a stand-in tokenizer: id i is the word t{i}, id 0 is EOS
        def eos_ids(self) -> list[int]:
            return [0]

        def decode(self, ids: list[int]) -> str:
            return " ".join(f"t{i}" for i in ids if i)

    out = io.StringIO()
    answers = LabelledAnswers(Words(), out, ("3", "5"))
    for step in ([5, 7], [6, 0], [8, 0]):  # row 2 ends at step 2; row 1 runs to the end
        answers(torch.tensor(step))
        if step == [6, 0]:
            assert out.getvalue() == "[5] t7\n", "a finished answer waits for the whole batch"
    answers.finish()
    assert out.getvalue() == "[5] t7\n[3] t5 t6 t8\n"


NO_START = ("import importlib, os, sys, shardwise.cli as cli\n"
            "os.sched_getaffinity = lambda pid: set(range(int(os.environ['CORES'])))  # the cores we may run on\n"
            "importlib.import_module('shardwise.launch')._start = lambda procs: sys.exit('STARTING')\n"
            "cli.main(sys.argv[1:])")


@pytest.mark.parametrize("tp,pp,cores,warning", [
    (9, 2, 2, "18 ranks on 2 CPU cores: the ranks take turns on the cores and every collective waits for the ranks "
              "that are not running, so this runs slower than with at most 2 ranks, and each rank adds the memory of "
              "its own Python and torch"),
    (2, 1, 1, "2 ranks on 1 CPU core: the ranks take turns"),  # a taskset or cpuset of one core on a bigger machine
    (2, 1, 2, None),
])
def test_more_ranks_than_cores_is_one_warning_saying_what_it_costs(with_tokenizer, tp, pp, cores, warning):
    argv = ["generate", str(with_tokenizer), "--tp", str(tp), "--pp", str(pp), "--prompt", "t1", "--max-new-tokens",
            "8"]
    out = python_run([sys.executable, "-c", NO_START, *argv], capture_output=True, text=True, timeout=120,
                     env={**os.environ, "CORES": str(cores)})
    *said, last = out.stderr.splitlines()
    assert last == "STARTING" and len(said) == (warning is not None), out.stderr
    if warning:
        assert said[0].split(" shardwise.launch: ", 1)[1].startswith(warning), out.stderr


def test_under_torchrun_one_rank_reports(checkpoints, tmp_path):
    out = shardwise("reshard", str(checkpoints["qwen2-tied"]), str(tmp_path / "s"), "--tp", "2", torchrun=2)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("wrote") == 1, out.stdout
