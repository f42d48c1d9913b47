"""`shardwise train`: the token stream's order, its refusals before spawning, and a short real run."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB
from forked_python import run as python_run
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_launch import SharedLaunches
from test_cli import NO_SPAWN

from shardwise import Layout
from shardwise.io.loader import Provide
from shardwise.io.reader import MANIFEST
from shardwise.train.data import TokenStream, check_batching, tokenize_file
from shardwise.train.run import TrainArgs, learning_rate, log_header
from shardwise.train.state import Record

# the windows' order reversed, as another torch version might draw it
OTHER_RANDPERM = ("import shardwise.train.data as data\norder = data.TokenStream.order\n"
                  "data.TokenStream.order = lambda stream, epoch: order(stream, epoch).flip(0)\n")


@pytest.fixture(scope="module")
def with_tokenizer(checkpoints, tmp_path_factory) -> Path:
    return _with_tokenizer(checkpoints["qwen2-untied"], tmp_path_factory.mktemp("train") / "ckpt")


def _with_tokenizer(checkpoint: Path, path: Path) -> Path:
    """A copy of a tiny checkpoint with a word-level tokenizer (tokens t0..t130) whose EOS is t130."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(shutil.copytree(checkpoint, path))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": VOCAB - 1}))
    return path


def _stream(n_tokens: int, seq: int, batch: int, seed: int) -> TokenStream:
    return TokenStream.from_ids(list(range(n_tokens)), seq, batch, seed)


@settings(max_examples=60, deadline=None)
@given(n_tokens=st.integers(2, 200), seq=st.integers(2, 9), batch=st.integers(3, 12), seed=st.integers(0, 2**40),
       step=st.integers(1, 30), accumulate=st.integers(1, 3))
def test_every_layout_sees_the_same_global_windows(n_tokens, seq, batch, seed, step, accumulate):
    if n_tokens < seq:
        return
    stream = _stream(n_tokens, seq, batch, seed)
    expected = stream.global_batch(step)
    for dp in (1, 2, 3):
        if batch // dp < accumulate:
            continue
        parts = [stream.micro_batches(step, d, dp, accumulate) for d in range(dp)]
        assert all(len(p) == accumulate and all(len(m) > 0 for m in p) for p in parts)
        assert torch.equal(torch.cat([m for p in parts for m in p]), expected)
    # a fresh stream from the same (seed, step) gives the same windows: nothing else is state
    assert torch.equal(_stream(n_tokens, seq, batch, seed).global_batch(step), expected)


@settings(max_examples=40, deadline=None)
@given(windows=st.integers(1, 20), batch=st.integers(1, 7), seed=st.integers(0, 2**40))
def test_each_epoch_is_a_permutation_and_steps_wrap_into_the_next(windows, batch, seed):
    stream = _stream(windows * 4, 4, batch, seed)
    steps = -(-3 * windows // batch)
    order = [i for s in range(1, steps + 1) for i in stream.indices(s)]
    for epoch in range(3):
        assert sorted(order[epoch * windows:(epoch + 1) * windows]) == list(range(windows))
        assert order[epoch * windows:(epoch + 1) * windows] == stream.order(epoch).tolist()


def test_order_depends_on_the_seed():
    a, b = _stream(400, 4, 8, 1), _stream(400, 4, 8, 2)
    assert not torch.equal(a.global_batch(1), b.global_batch(1))
    assert not torch.equal(a.order(0), a.order(1))  # epochs are shuffled afresh


def test_global_tokens_and_windows_drop_the_tail():
    stream = _stream(23, 5, 3, 0)
    assert stream.windows.shape == (4, 5) and stream.predicted() == 3 * 4
    assert stream.windows.flatten().tolist() == list(range(20))


def test_refusals():
    with pytest.raises(ValueError, match=r"notes.txt: 3 tokens, too few for one window of --seq 4"):
        TokenStream.from_ids([1, 2, 3], 4, 1, 0, "notes.txt")
    with pytest.raises(ValueError, match=r"--batch 5 over --dp 3 gives some rank 1 window, too few for "
                                         r"--accumulate 2 micro-batches; use --batch >= 6"):
        check_batching(5, 3, 2)
    check_batching(6, 3, 2)


def test_paragraphs_are_joined_with_eos(with_tokenizer, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("t1 t2\nt3\n\n\n  t4 t5 t130\n\n")
    assert tokenize_file(with_tokenizer, data) == [1, 2, 3, 130, 4, 5, 130]


def test_learning_rate_schedule():
    assert [learning_rate(s, 1.0, 10, warmup=4) for s in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = [learning_rate(s, 1.0, 10, warmup=2, schedule="cosine") for s in range(1, 11)]
    assert cosine[1] == 1.0 and cosine[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(cosine[1:], cosine[2:]))


def test_without_a_terminal_training_says_where_it_stands_every_10_steps_and_at_least_every_30_s(monkeypatch,
                                                                                                capsys):
    """Steps 5..25 of a resumed run, each a second long but step 7, which takes 40 s: a line after step 7 (30 s
    since the last), 10, 20 and the last, each with the time gone and the time left at the mean pace so far."""
    import types

    import shardwise.progress as progress

    now = [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    meter = progress.StepProgress(True, 5, 25)
    for step in range(5, 26):
        now[0] += 40 if step == 7 else 1
        meter.update(step, {"loss": f"{1 / step:.3f}"})
    meter.close()
    assert capsys.readouterr().err.splitlines() == [
        "[shardwise] step 7/25 loss 0.143 elapsed 00:42 remaining 04:12",
        "[shardwise] step 10/25 loss 0.100 elapsed 00:45 remaining 01:52",
        "[shardwise] step 20/25 loss 0.050 elapsed 00:55 remaining 00:17",
        "[shardwise] step 25/25 loss 0.040 elapsed 01:00 remaining 00:00"]


@pytest.mark.parametrize("args,error", [
    (["--pp", "2", "--train", "prompt-table", "--virtual-tokens", "2"],
     "--pp 2: prompt tuning runs on one pipeline stage; use --pp 1"),
    (["--provider", "series", "--dp", "2"], "--provider series: training runs on resident or zero3"),
    (["--series", "*.o", "--dp", "2"], "--series declares layers of --provider series"),
    (["--dp", "2", "--batch", "3", "--accumulate", "2"], "--batch 3 over --dp 2 gives some rank 1 window"),
    (["--seq", "64"], "d.txt: 20 tokens, too few for one window of --seq 64"),
    (["--seq", "1"], "argument --seq: 1 must be >= 2"),
    (["--lr", "0"], "argument --lr: 0 must be > 0.0"),
    (["--work-dtype", "bfloat16"], "--work-dtype and --offload need --provider zero3: resident weights"),
    (["--tp", "10"], "LayoutError: tp=10 exceeds the 9 query heads"),
    (["--save", "{tmp}/foreign"], "holds files that are not part of a checkpoint (notes.txt)"),
    (["--save", "{ckpt}"], "is the source checkpoint itself"),
    (["--save", "{other}"], "a checkpoint is already there; pass --overwrite"),
    (["--data", "{tmp}/missing.txt"], "missing.txt: cannot read the training text"),
    (["--log", "{tmp}/nowhere/log.jsonl"], "its directory does not exist"),
    (["--log", "{tmp}"], "is a directory; give a file for the JSON lines"),
    (["--log", "{tmp}/d.txt"], "d.txt: exists and is not a shardwise training log; shardwise never overwrites or "
                               "appends to a file it did not write: give another file"),
    (["--log", "{tmp}/other.jsonl", "--resume", "{ckpt}"], "other.jsonl: is the training log of another model"),
    (["--resume", "{ckpt}"], "shardwise.json: not a readable shardwise manifest"),
    (["--resume", "{other}"], "its config.json describes another model than"),
    (["--resume", "{ckpt}/config.json"], "config.json: is a file; give the checkpoint directory, not a file"),
])
def test_bad_arguments_are_one_line_errors_before_any_rank_starts(checkpoints, with_tokenizer, tmp_path, args,
                                                                  error):
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"t{i}" for i in range(1, 20)))  # 19 words + EOS
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "other.jsonl").write_text(json.dumps(log_header(checkpoints["llama-untied"])) + "\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    names = {"tmp": tmp_path, "ckpt": with_tokenizer, "other": checkpoints["llama-untied"]}
    base = ["train", str(with_tokenizer), "--data", str(data), "--steps", "2", "--batch", "2", "--seq", "4",
            "--save", str(tmp_path / "out")]
    argv = base + [a.format(**names) for a in args]
    out = python_run([sys.executable, "-c", NO_SPAWN, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "SPAWNED" not in out.stderr, out.stderr
    assert error in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not out.stderr.splitlines()[-1].startswith("shardwise: rank "), out.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, "a refusal changed a file"


@pytest.mark.parametrize("words,batch,warnings", [
    (5, 2, ["6 tokens make 1 window of --seq 4, fewer than --batch 2: every step repeats windows",
            "the last 2 tokens of 6 (33%) fill no window of --seq 4 and are never trained on"]),
    (8, 3, ["9 tokens make 2 windows of --seq 4, fewer than --batch 3: every step repeats windows",
            "the last 1 token of 9 (11%) fill no window"]),
    (402, 3, []),  # 100 windows and a tail of 3 tokens, under 1 % of the text: nothing to say
])
def test_a_short_text_is_trained_on_with_a_warning_that_gives_the_numbers(with_tokenizer, tmp_path, words, batch,
                                                                          warnings):
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"t{i % 100 + 1}" for i in range(words)))  # + EOS
    argv = ["train", str(with_tokenizer), "--data", str(data), "--steps", "2", "--batch", str(batch), "--seq", "4",
            "--save", str(tmp_path / "out")]
    out = python_run([sys.executable, "-c", NO_SPAWN, *argv], capture_output=True, text=True, timeout=120)
    lines = out.stderr.splitlines()
    assert lines[-1] == "SPAWNED" and len(lines) == len(warnings) + 1, out.stderr
    for warning, line in zip(warnings, lines):
        assert f" shardwise: {data}: {warning}" in line, out.stderr


@pytest.mark.parametrize("provider", ["resident", "zero3"])
def test_a_short_run_at_dp2_lowers_the_loss_and_saves(with_tokenizer, tmp_path, provider):
    from shardwise import load_model

    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(" ".join(f"t{i}" for i in range(1, 16)) for _ in range(20)))
    log, out = tmp_path / "log.jsonl", tmp_path / "trained"
    log.write_text(json.dumps(log_header(with_tokenizer)) + '\n{"step": 1, "loss": 9.0}\n')  # an older run's: replaced
    command = [sys.executable, "-m", "shardwise.cli", "train", str(with_tokenizer), "--data", str(data), "--steps", "6",
               "--dp", "2", "--provider", provider, "--batch", "4", "--seq", "16", "--accumulate", "2", "--lr", "3e-3",
               "--warmup", "1", "--save-every", "2"]
    run = python_run([*command, "--save", str(out), "--log", str(log)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    header, *rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert header == {"log": "shardwise train log", "model": str(with_tokenizer.resolve())}
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses
    assert rows[0]["lr"] == pytest.approx(3e-3) and all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" in run.stdout, run.stdout
    # no terminal: one line at the last step (the interval is 10 steps), as HF's Trainer writes to a log file
    progress = [line for line in run.stderr.splitlines() if line.startswith("[shardwise] step ")]
    expected = (rf"\[shardwise\] step 6/6 loss {losses[-1]:.4f} lr 3\.00e-03 tokens/s \d+ "
                r"elapsed \d\d:\d\d remaining 00:00")
    assert len(progress) == 1 and re.fullmatch(expected, progress[0]), run.stderr
    assert "\r" not in run.stderr and re.search(r"^\[shardwise\] rank 0 loading \d+ boxes in [\d.]+s$", run.stderr,
                                                re.M), run.stderr
    before, after = load_model(with_tokenizer, progress=False), load_model(out, progress=False)
    with before, after:
        changed = [n for n in before.weights.tensors if not torch.equal(before.weights.tensors[n],
                                                                        after.weights.tensors[n])]
    assert changed, "the saved checkpoint is the untrained one"
    if provider == "resident":  # the training checkpoint exports to HF, which transformers loads as trained
        import transformers

        hf = tmp_path / "hf"
        run = python_run([sys.executable, "-m", "shardwise.cli", "export", str(out), str(hf)],
                         capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert re.search(r"^\[shardwise\] exporting \d+ boxes in [\d.]+s$", run.stderr, re.M), run.stderr
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        ids = torch.arange(1, 17).reshape(2, 8)
        with load_model(out, progress=False) as trained, torch.no_grad():
            torch.testing.assert_close(hf_model(input_ids=ids).logits, trained(ids), rtol=1e-5, atol=1e-5)
    if provider == "zero3":  # --offload: masters, moments and gradient sums in host memory train the same numbers
        offloaded = tmp_path / "offloaded"
        run = python_run([*command, "--offload", "--save", str(offloaded), "--log", str(tmp_path / "off.jsonl")],
                         capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        _, *offloaded_rows = [json.loads(line) for line in (tmp_path / "off.jsonl").read_text().splitlines()]
        assert [r["loss"] for r in offloaded_rows] == losses
        files = sorted(f.name for f in out.iterdir())
        assert sorted(f.name for f in offloaded.iterdir()) == files
        assert not [f for f in files if (out / f).read_bytes() != (offloaded / f).read_bytes()]
    if provider == "zero3":  # and go on from it, resident at tp 2, two steps more
        run = python_run([sys.executable, "-m", "shardwise.cli", "train", str(with_tokenizer), "--resume", str(out),
                          "--data", str(data),
                          "--steps", "8", "--tp", "2", "--batch", "4", "--seq", "16", "--lr", "3e-3",
                          "--save", str(tmp_path / "more"), "--log", str(log)],
                         capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert [json.loads(line).get("step") for line in log.read_text().splitlines()] == [None, *range(1, 9)]
        assert "trained steps 7..8" in run.stdout, run.stdout
        assert "--resume" in run.stderr and "this run changes steps 6 -> 8" in run.stderr, run.stderr


# Resume: a run saved at step 2 of 4, continued under other layouts and providers.

RESUMES = {  # name: (layout, provider, the saved run's provider)
    "same layout": (Layout(dp=2), "resident", "resident"),
    "same layout, zero3": (Layout(dp=2), "zero3", "zero3"),
    "dp 2->3": (Layout(dp=3), "resident", "resident"),
    "tp 1->2": (Layout(tp=2), "resident", "resident"),
    "resident->zero3": (Layout(dp=2), "zero3", "resident"),
    "zero3->resident": (Layout(tp=2, dp=1), "resident", "zero3"),
    "pp 1->2": (Layout(pp=2), "resident", "resident"),
    "pp 1->3, zero3": (Layout(pp=3), "zero3", "zero3"),
    "pp 2->1": (Layout(dp=2), "resident", "pp2"),
    "pp 2->tp 2": (Layout(tp=2), "zero3", "pp2"),
    "pp 2->3": (Layout(pp=3), "resident", "pp2"),
    "tp 2->pp 2, zero3": (Layout(pp=2), "zero3", "tp2"),
    "pp 3->2 x dp 2": (Layout(pp=2, dp=2), "resident", "pp3"),
}
HALFWAY = {"resident": (Layout(dp=2), "resident"), "zero3": (Layout(dp=2), "zero3"), "pp2": (Layout(pp=2), "resident"),
           "tp2": (Layout(tp=2), "resident"), "pp3": (Layout(pp=3), "resident")}


def _job(checkpoint, stream, layout, provider, steps, save, log, resume=None) -> TrainArgs:
    """A constant schedule after warmup: a step's rate must not depend on how many steps the run was told."""
    return TrainArgs(str(checkpoint), layout, Provide(provider), stream, steps, 3e-3, str(save), warmup=1,
                     weight_decay=0.1, log=str(log), resume=resume)


def _losses(log: Path) -> list[float]:
    """The losses of a training log, after its first line (which names the model)."""
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()[1:]]


RESUMED_TIED = (Layout(dp=2), "zero3")  # the tied bf16 model's run, resumed


def _resume_stream(checkpoint: Path, tmp: Path) -> TokenStream:
    data = tmp / "d.txt"
    data.write_text("\n\n".join(" ".join(f"t{(i * 7 + j) % 120 + 1}" for j in range(15)) for i in range(20)))
    return TokenStream.from_file(checkpoint, data, 16, 6, 3)  # 6 windows a step: even over dp 2 and 3


def _keeping_step_2(checkpoint: Path, stream: TokenStream, name: str, tmp: Path) -> tuple[int, Callable, tuple]:
    """An uninterrupted 4-step run (``HALFWAY[name]``: at dp 2, pp 2, tp 2 or pp 3), logging to ``tmp/<name>.jsonl`` and
    keeping the training checkpoint it saves at step 2 as ``tmp/<name>-2``."""
    from train_workers import train_keeping_every_save

    layout, provider = HALFWAY.get(name, (Layout(dp=2), name))
    job = _job(checkpoint, stream, layout, provider, 4, tmp / name, tmp / f"{name}.jsonl")
    return layout.world_size, train_keeping_every_save, (dataclasses.replace(job, save_every=2),)


def _resuming(checkpoint: Path, stream: TokenStream, layout: Layout, provider: str, saved: Path, tmp: Path
              ) -> tuple[int, Callable, tuple]:
    """Steps 3 and 4 resumed from ``saved`` under ``layout`` and ``provider``, saved to ``tmp/out`` and logged to
    ``tmp/log.jsonl``."""
    from shardwise.train.run import train_rank

    tmp.mkdir(parents=True)
    job = _job(checkpoint, stream, layout, provider, 4, tmp / "out", tmp / "log.jsonl", resume=str(saved))
    return layout.world_size, train_rank, (job,)


@pytest.fixture(scope="module")
def runs(with_tokenizer, checkpoints, tmp_path_factory) -> dict[str, Any]:
    """Every training run of the resume tests, one launch per world size (spawning ranks is the slow part): the
    uninterrupted runs that keep their step-2 checkpoints (resident and zero3 on the untied fp32 model, resident on
    a tied bf16 one), then, in the same launch, each resume of them."""
    tmp, tied_tmp = tmp_path_factory.mktemp("resume"), tmp_path_factory.mktemp("tied")
    tied = _with_tokenizer(checkpoints["qwen2-tied"], tied_tmp / "tied")
    stream, tied_stream = _resume_stream(with_tokenizer, tmp), _resume_stream(tied, tied_tmp)
    jobs = {("halfway", name): _keeping_step_2(with_tokenizer, stream, name, tmp) for name in HALFWAY}
    jobs["halfway", "tied"] = _keeping_step_2(tied, tied_stream, "resident", tied_tmp)
    for name, (layout, provider, saved_by) in RESUMES.items():
        jobs["resume", name] = _resuming(with_tokenizer, stream, layout, provider, tmp / f"{saved_by}-2",
                                         tmp / "resumed" / name)
    jobs["resume", "tied"] = _resuming(tied, tied_stream, *RESUMED_TIED, tied_tmp / "resident-2", tied_tmp / "resumed")
    return dict(launches=SharedLaunches(jobs, timeout=600, needs={3: (2,), 4: (3,)}), tmp=tmp, stream=stream, tied=tied,
                tied_tmp=tied_tmp, tied_stream=tied_stream)


@pytest.fixture(scope="module")
def halfway(runs):
    """Uninterrupted 4-step runs (resident and zero3 at dp 2, resident at pp 2, tp 2 and pp 3), each also saving a
    training checkpoint at step 2."""
    full, saved = {}, {}
    for name in HALFWAY:
        runs["launches"].result(("halfway", name))
        full[name], saved[name] = _losses(runs["tmp"] / f"{name}.jsonl"), runs["tmp"] / f"{name}-2"
    return runs["stream"], full, saved


def _resumed(runs: dict[str, Any], name: str) -> list[float]:
    """The losses of steps 3 and 4 of the resume ``name``, which started at step 3 and saved step 4."""
    tmp = runs["tied_tmp"] / "resumed" if name == "tied" else runs["tmp"] / "resumed" / name
    assert runs["launches"].result(("resume", name))[0]["first_step"] == 3
    assert Record.read(tmp / "out").step == 4
    return _losses(tmp / "log.jsonl")


def test_pipeline_stages_train_as_one_stage_does(halfway):
    """The uninterrupted run at pp 2 (its stages' checkpoints saved and logged as at pp 1) takes the dp 2 run's
    steps."""
    _, full, _ = halfway
    assert full["pp2"] == pytest.approx(full["resident"], abs=1e-5, rel=0)


@pytest.mark.parametrize("name", RESUMES)
def test_resume_continues_the_uninterrupted_run(halfway, runs, name):
    stream, full, saved = halfway
    layout, provider, saved_by = RESUMES[name]
    resumed, expected = _resumed(runs, name), full[saved_by][2:]
    if name.startswith("same layout"):
        assert resumed == expected  # bit for bit
    else:
        assert resumed == pytest.approx(expected, abs=1e-5, rel=0)


@pytest.fixture(scope="module")
def tied(runs):
    """A tied bf16 model with a tokenizer, its token stream, and an uninterrupted 4-step resident run at dp 2: its
    losses and the training checkpoint it saved at step 2."""
    runs["launches"].result(("halfway", "tied"))
    tmp = runs["tied_tmp"]
    return runs["tied"], runs["tied_stream"], _losses(tmp / "resident.jsonl"), tmp / "resident-2"


def test_resume_of_a_tied_bf16_model_from_resident_to_zero3(tied, runs):
    """One tensor for the embedding and the head: its moments saved once, and restored into both providers' plans."""
    checkpoint, stream, full, saved = tied
    resumed = _resumed(runs, "tied")  # at dp 2 on zero3 (RESUMED_TIED)
    assert resumed == pytest.approx(full[2:], abs=1e-5, rel=0)


def _config_dtype(directory: Path) -> str:
    return json.loads((directory / "config.json").read_text())["dtype"]


def test_a_training_checkpoint_exports_in_the_dtype_of_the_model_it_was_trained_from(tied, tmp_path):
    """Its fp32 masters (which its config.json names) export as the bf16 base unless --dtype says otherwise, and
    reshard takes --dtype too; a record older than its dtype field falls back to the config's dtype (then the base
    model's, copied). Whatever is written, config.json names the dtype the files hold."""
    from shardwise.io.reader import Checkpoint
    from shardwise.io.sharded import ShardedCheckpoint

    saved = tied[3]
    assert _config_dtype(saved) == "float32" and Record.read(saved).dtype == torch.bfloat16
    old = Path(shutil.copytree(saved, tmp_path / "old"))
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["train"]["dtype"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    (old / "config.json").write_text(json.dumps(json.loads((old / "config.json").read_text()) | {"dtype": "float16"}))
    for argv in (["export", saved, tmp_path / "hf"], ["export", old, tmp_path / "old-hf"],
                 ["reshard", saved, tmp_path / "f32", "--dtype", "float32"]):
        run = python_run([sys.executable, "-m", "shardwise.cli", *map(str, argv)], capture_output=True, text=True,
                         timeout=300)
        assert run.returncode == 0, run.stderr
    for name, dtype in (("hf", torch.bfloat16), ("old-hf", torch.float16)):
        with Checkpoint(tmp_path / name) as hf:
            assert {e.dtype for e in hf.entries.values()} == {dtype}, name
        assert _config_dtype(tmp_path / name) == str(dtype).removeprefix("torch."), name
    with ShardedCheckpoint(tmp_path / "f32") as resharded:
        assert {dtype for _, dtype in resharded.tensors.values()} == {torch.float32} and not resharded.record
    assert _config_dtype(tmp_path / "f32") == "float32"


def test_resume_in_place_replaces_the_run_with_each_save_as_if_it_never_stopped(halfway, with_tokenizer, tmp_path):
    """--resume RUN --save RUN --save-every 1, a pre-emptible job's pattern: steps 3 and 4 are bit for bit the
    uninterrupted run's (every rank read RUN before a save replaced it) and RUN ends at step 4, nothing left beside
    it. A RUN of other data is refused before any rank starts, and left as it was."""
    stream, full, saved = halfway
    run, log = Path(shutil.copytree(saved["resident"], tmp_path / "run")), tmp_path / "log.jsonl"
    _resume_stream(with_tokenizer, tmp_path)  # the text the halfway runs trained on, as tmp_path / "d.txt"
    argv = ["train", str(with_tokenizer), "--resume", str(run), "--save", str(run), "--save-every", "1",
            "--data", str(tmp_path / "d.txt"), "--steps", "4", "--dp", "2", "--batch", "6", "--seq", "16",
            "--lr", "3e-3", "--warmup", "1", "--weight-decay", "0.1", "--log", str(log), "--seed"]
    refused = python_run([sys.executable, "-c", NO_SPAWN, *argv, "4"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "SPAWNED" not in refused.stderr, refused.stderr
    assert "training on seed 3, but this run has 4: --seed must match to resume" in refused.stderr, refused.stderr
    assert Record.read(run).step == 2
    done = python_run([sys.executable, "-m", "shardwise.cli", *argv, "3"], capture_output=True, text=True,
                      timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trained steps 3..4" in done.stdout and _losses(log) == full["resident"][2:]
    assert Record.read(run).step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.txt", "log.jsonl", "run"]


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_intact(halfway, with_tokenizer, tmp_path):
    from train_workers import die_while_saving

    from shardwise.launch import RankError, launch

    stream = halfway[0]
    saves = [tmp_path / "kept", tmp_path / "copy"]
    with pytest.raises(RankError, match="rank 1"):
        launch(die_while_saving, 2, str(with_tokenizer), stream, [str(s) for s in saves], timeout=60)
    kept, copy = (sorted(p.name for p in s.iterdir()) for s in saves)
    assert kept == copy
    assert all((saves[0] / f).read_bytes() == (saves[1] / f).read_bytes() for f in kept)
    assert Record.read(saves[0]).step == 1
    assert not [p for p in tmp_path.iterdir() if p not in saves and (p / MANIFEST).exists()]


def test_resume_refuses_other_data_and_no_steps_left(halfway, with_tokenizer):
    from shardwise import load_model
    from shardwise.train.optim import AdamW
    from shardwise.train.state import restore

    stream, _, saved = halfway
    with load_model(with_tokenizer, progress=False) as model, pytest.raises(ValueError, match="the model was loaded "
                                                                            "from .*load the model from the training"):
        restore(saved["resident"], model, AdamW(model.provider))
    record = Record.read(saved["resident"])
    assert record.step == 2
    with pytest.raises(ValueError, match="training on seed 3, but this run has 4: --seed must match"):
        record.check_resumable(saved["resident"], dataclasses.replace(stream, seed=4), 4)
    other = TokenStream.from_ids(stream.windows.flip(0).flatten().tolist(), 16, 6, 3)
    with pytest.raises(ValueError, match="the token windows .* must match"):
        record.check_resumable(saved["resident"], other, 4)
    with pytest.raises(ValueError, match="--steps 2 leaves nothing to train"):
        record.check_resumable(saved["resident"], stream, 2)


def test_a_weights_only_or_forged_checkpoint_is_not_resumed(halfway, tmp_path):
    from shardwise.io.reader import CheckpointError
    from shardwise.io.sharded import ShardedCheckpoint
    from shardwise.plan.spec import load_spec
    from shardwise.train.optim import MOMENTS

    saved = halfway[2]["resident"]
    forged = Path(shutil.copytree(saved, tmp_path / "forged"))
    manifest = json.loads((forged / MANIFEST).read_text())
    for record, error in [({}, "no 'train' record: not a training checkpoint"),
                          ({"step": "2", "data": {}}, "field 'train.step' is str '2', expected an integer >= 1"),
                          ({"step": 2, "data": {"seed": 1}}, "field 'train.data' is"),
                          ({"step": 2, "data": {**manifest["train"]["data"], "order": 7}}, "field 'train.data' is")]:
        (forged / MANIFEST).write_text(json.dumps({**manifest, "train": record}))
        with pytest.raises(CheckpointError, match=re.escape(error)):
            Record.read(forged)
    kept = [n for n in manifest["tensors"] if not n.startswith("exp_avg_sq/")]
    stripped = {**manifest, "tensors": {n: manifest["tensors"][n] for n in kept},
                "files": [{**f, "pieces": [p for p in f["pieces"] if p["source"] in kept]} for f in manifest["files"]]}
    (forged / MANIFEST).write_text(json.dumps(stripped))
    with pytest.raises(CheckpointError, match="exp_avg_sq/.*is missing: not a training checkpoint saved with its "
                                              "optimizer state"):
        ShardedCheckpoint(forged).check_state(load_spec(forged), MOMENTS)


def test_resume_refuses_a_randperm_that_orders_the_windows_otherwise(halfway, with_tokenizer, tmp_path):
    """The record keeps a digest of the order the windows are drawn in: where torch.randperm shuffles otherwise (here
    reversed), `shardwise train --resume` is refused in one line before any rank starts, instead of training on
    other batches; with the saving run's order the same command goes ahead."""
    saved = halfway[2]["resident"]
    argv = ["train", str(with_tokenizer), "--resume", str(saved), "--data", str(saved.parent / "d.txt"), "--steps",
            "4", "--dp", "2", "--batch", "6", "--seq", "16", "--seed", "3", "--save", str(tmp_path / "out")]
    same = python_run([sys.executable, "-c", NO_SPAWN, *argv], capture_output=True, text=True, timeout=120)
    assert same.stderr.splitlines()[-1] == "SPAWNED", same.stderr
    other = python_run([sys.executable, "-c", OTHER_RANDPERM + NO_SPAWN, *argv], capture_output=True, text=True,
                       timeout=120)
    assert other.returncode != 0 and other.stdout == "", other.stderr
    assert len(other.stderr.splitlines()) == 1, other.stderr
    assert re.fullmatch(rf"shardwise: ValueError: {re.escape(str(saved))}: saved at step 2 training on order \w+, but "
                        r"this run has \w+: the order the windows are drawn in \(torch.randperm shuffles them "
                        r"otherwise here than in the saving run: another torch version\?\) must match to resume\n",
                        other.stderr), other.stderr
