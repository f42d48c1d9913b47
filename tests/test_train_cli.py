"""`shardwise train`: the token stream's order, its refusals before spawning, and a short real run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwise.data import TokenStream, check_batching, tokenize_file
from shardwise.train_run import learning_rate

NO_SPAWN = "import sys, shardwise.cli as cli\ncli.launch = lambda *a, **k: sys.exit('SPAWNED')\ncli.main(sys.argv[1:])"


@pytest.fixture(scope="module")
def with_tokenizer(checkpoints, tmp_path_factory) -> Path:
    """A tiny checkpoint with a word-level tokenizer (tokens t0..t130) whose EOS is t130."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(shutil.copytree(checkpoints["qwen2-untied"], tmp_path_factory.mktemp("train") / "ckpt"))
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
    assert stream.windows.shape == (4, 5) and stream.global_tokens == 3 * 4
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


@pytest.mark.parametrize("args,error", [
    (["--pp", "2"], "--pp 2: training over pipeline stages is not built yet; use --pp 1"),
    (["--provider", "series", "--dp", "2"], "--provider series: training runs on resident or zero3"),
    (["--series", "*.o", "--dp", "2"], "--series declares layers of --provider series"),
    (["--dp", "2", "--batch", "3", "--accumulate", "2"], "--batch 3 over --dp 2 gives some rank 1 window"),
    (["--seq", "64"], "d.txt: 20 tokens, too few for one window of --seq 64"),
    (["--seq", "1"], "argument --seq: 1 must be >= 2"),
    (["--lr", "0"], "argument --lr: 0 must be > 0.0"),
    (["--work-dtype", "bfloat16"], "work_dtype and offload need provider='zero3'"),
    (["--tp", "10"], "LayoutError: tp=10 exceeds the 9 query heads"),
    (["--save", "{tmp}/foreign"], "holds files that are not part of a checkpoint (notes.txt)"),
    (["--save", "{ckpt}"], "is the source checkpoint itself"),
    (["--save", "{other}"], "a checkpoint is already there; pass --overwrite"),
    (["--data", "{tmp}/missing.txt"], "missing.txt: cannot read the training text"),
    (["--log", "{tmp}/nowhere/log.jsonl"], "its directory does not exist"),
])
def test_bad_arguments_are_one_line_errors_before_any_rank_starts(checkpoints, with_tokenizer, tmp_path, args,
                                                                  error):
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"t{i}" for i in range(1, 20)))  # 19 words + EOS
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    names = {"tmp": tmp_path, "ckpt": with_tokenizer, "other": checkpoints["llama-untied"]}
    base = ["train", str(with_tokenizer), "--data", str(data), "--steps", "2", "--batch", "2", "--seq", "4",
            "--save", str(tmp_path / "out")]
    argv = base + [a.format(**names) for a in args]
    out = subprocess.run([sys.executable, "-c", NO_SPAWN, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "SPAWNED" not in out.stderr, out.stderr
    assert error in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not out.stderr.splitlines()[-1].startswith("shardwise: rank "), out.stderr


@pytest.mark.parametrize("provider", ["resident", "zero3"])
def test_a_short_run_at_dp2_lowers_the_loss_and_saves(with_tokenizer, tmp_path, provider):
    from shardwise import load_model

    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(" ".join(f"t{i}" for i in range(1, 16)) for _ in range(20)))
    log, out = tmp_path / "log.jsonl", tmp_path / "trained"
    run = subprocess.run([sys.executable, "-m", "shardwise.cli", "train", str(with_tokenizer), "--data", str(data),
                          "--steps", "6", "--dp", "2", "--provider", provider, "--batch", "4", "--seq", "16",
                          "--accumulate", "2", "--lr", "3e-3", "--warmup", "1", "--save", str(out), "--save-every", "2",
                          "--log", str(log)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses
    assert rows[0]["lr"] == pytest.approx(3e-3) and all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" in run.stdout, run.stdout
    before, after = load_model(with_tokenizer, progress=False), load_model(out, progress=False)
    with before, after:
        changed = [n for n in before.weights.tensors if not torch.equal(before.weights.tensors[n],
                                                                        after.weights.tensors[n])]
    assert changed, "the saved checkpoint is the untrained one"
