"""Trust: nothing a user owns is lost, nothing in a checkpoint runs, every input is checked, failures are agreed."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from forked_python import run as python_run
from publish_workers import bytes_written_by_export, faults_at_every_step
from shared_launch import SharedLaunches
from test_cli import shardwise, with_tokenizer  # noqa: F401 - with_tokenizer is a fixture
from test_export import assert_same_checkpoint, digest
from workers import reshard_all

from shardwise import (
    Checkpoint,
    CheckpointError,
    Layout,
    ShardedCheckpoint,
    SpecError,
    load_spec,
    load_weights,
    save_sharded,
)
from shardwise.io.collective_write import write_checkpoint
from shardwise.io.publish import OWNER_FILE, TMP_PREFIX, TargetError, _owner, check_target
from shardwise.model.text import TemplateError, Text


@pytest.fixture
def foreign(tmp_path) -> Path:
    """A directory of a user's own models, the kind of place people type as a destination by mistake."""
    models = tmp_path / "models"
    (models / "other-model").mkdir(parents=True)
    (models / "other-model" / "notes.txt").write_text("my notes")
    return models


def _untouched(models: Path) -> None:
    assert (models / "other-model" / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in models.iterdir()) == ["other-model"]
    assert not [p for p in models.parent.iterdir() if p.name.startswith(TMP_PREFIX)]


@pytest.fixture(scope="module")
def launched(checkpoints, tmp_path_factory) -> SimpleNamespace:
    """This module's writes by ranks, one launch per world size (spawning ranks is the slow part), and where they
    write: ``launches.result(job)`` runs them."""
    work = tmp_path_factory.mktemp("launched")
    mistral, llama = str(checkpoints["mistral-untied"]), str(checkpoints["llama-untied"])
    out = SimpleNamespace(sharded=work / "sharded" / "s", faults=work / "faults" / "ckpt",
                          exported=work / "exported" / "out", sharded_tp4=work / "sharded-tp4" / "s")
    reshard_all({"m": mistral}, {"m": str(out.faults)}, 1, 1)  # the checkpoint the faults must leave intact
    out.before_faults = digest(out.faults)
    out.launches = SharedLaunches({
        "sharded": (2, reshard_all, ({"m": mistral}, {"m": str(out.sharded)}, 2, 1)),
        "faults": (2, faults_at_every_step, (mistral, str(out.faults), _fault_cases())),
        # llama-untied: 9 query / 3 KV heads: at TP=4 each KV head sits on several ranks, at different offsets
        "export at tp=4": (4, bytes_written_by_export, (llama, str(out.exported), 4)),
        "sharded at tp=4": (4, reshard_all, ({"m": llama}, {"m": str(out.sharded_tp4)}, 4, 1)),
    }, timeout=600)
    return out


@pytest.fixture(scope="module")
def sharded(launched) -> Path:
    """A TP=2 sharded checkpoint of an untied fp32 model."""
    launched.launches.result("sharded")
    return launched.sharded


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_cli_writes_refuse_a_directory_with_foreign_files(checkpoints, sharded, foreign, tmp_path, overwrite):
    from test_gguf import KINDS, write_tiny_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf", KINDS)
    for cmd in (["reshard", str(checkpoints["qwen2-tied"]), str(foreign), "--tp", "1"],
                ["export", str(sharded), str(foreign)],
                ["import-gguf", str(tmp_path / "tiny.gguf"), str(foreign)]):
        out = shardwise(*cmd, *overwrite)
        assert out.returncode != 0, f"{cmd[0]} succeeded onto a directory of foreign files"
        assert "models: holds files that are not part of a checkpoint (other-model/)" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        _untouched(foreign)


def test_save_sharded_refuses_a_directory_with_foreign_files(checkpoints, foreign):
    weights = load_weights(checkpoints["qwen2-tied"], progress=False)
    for overwrite in (False, True):
        with pytest.raises(TargetError, match="other-model/"):
            save_sharded(weights, foreign, overwrite=overwrite)
        _untouched(foreign)


def test_export_onto_a_plain_file_is_refused_and_the_file_untouched(sharded, tmp_path):
    f = tmp_path / "f"
    f.write_text("hi\n")
    out = shardwise("export", str(sharded), str(f), "--overwrite")
    assert out.returncode != 0 and "f: is a file, not a checkpoint directory" in out.stderr, out.stderr
    assert f.read_text() == "hi\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_current_directory_and_source_are_refused(checkpoints, tmp_path, monkeypatch):
    src = checkpoints["llama-tied"]
    with pytest.raises(TargetError, match="is the source checkpoint itself"):
        check_target(src, overwrite=True, sources=[src])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TargetError, match="is the current directory"):
        check_target(".", overwrite=True)


def test_existing_checkpoint_needs_overwrite_and_empty_directory_is_written(checkpoints, sharded, tmp_path):
    target = tmp_path / "hf"
    target.mkdir()
    assert shardwise("export", str(sharded), str(target)).returncode == 0  # empty: written
    before = digest(target)
    out = shardwise("export", str(sharded), str(target))
    assert out.returncode != 0 and "pass --overwrite" in out.stderr, out.stderr
    assert digest(target) == before
    assert shardwise("export", str(sharded), str(target), "--overwrite").returncode == 0
    assert_same_checkpoint(checkpoints["mistral-untied"], target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_stale_temporary_directories_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f"{TMP_PREFIX}out-stale", tmp_path / f"{TMP_PREFIX}out-live"
    for d, owner in ((stale, _owner(tmp_path / "out") | {"pid": dead.pid}), (live, _owner(tmp_path / "out"))):
        d.mkdir()
        (d / OWNER_FILE).write_text(json.dumps(owner))
        (d / "model.safetensors").write_bytes(b"partial")
    write_checkpoint(tmp_path / "out", [("writing data", lambda tmp: (tmp / "config.json").write_text("{}"))])
    assert not stale.exists(), "the temporary directory of a dead writer was left behind"
    assert live.exists(), "the temporary directory of a live writer was removed"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json"]


# A script's start that writes a two-stage checkpoint with ``write(text)``, for the tests that kill it part-way.
WRITER = (
    "import os, sys\nfrom pathlib import Path\nimport shardwise.io.publish as pub\n"
    "from shardwise.io.collective_write import write_checkpoint\n"
    "def write(text):\n"
    "    return [('writing data', lambda tmp: (tmp / 'config.json').write_text(text)),\n"
    "            ('writing weights', lambda tmp: (tmp / 'model.safetensors').write_bytes(b'x'))]\n"
)


def test_a_write_killed_while_removing_the_checkpoint_it_replaced_leaves_it_to_the_next_write(tmp_path):
    out = tmp_path / "out"
    killed = (
        WRITER +
        "out = Path(sys.argv[1])\nwrite_checkpoint(out, write('{\"old\": 1}'))\n"
        "pub.remove_checkpoint = lambda old: os._exit(9)  # killed just as the old checkpoint's removal starts\n"
        "write_checkpoint(out, write('{}'), overwrite=True)\n")
    assert python_run([sys.executable, "-c", killed, str(out)], capture_output=True, text=True,
                      timeout=120).returncode == 9
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert (left / OWNER_FILE).exists() and (out / "config.json").read_text() == "{}"
    write_checkpoint(out, [("writing data", lambda tmp: (tmp / "model.safetensors").write_bytes(b"x"))],
                     overwrite=True)
    assert not left.exists(), "the replaced checkpoint a killed write was removing was left behind"


def _fault_cases() -> list[tuple[str, str, int, str]]:
    steps = ["checking the target", "creating the directory", "writing headers", "writing data",
             "syncing and verifying", "publishing"]
    # Renaming into place is rank 0's alone, and the commit point: after it no rank can undo the write.
    raised = [("export", step, rank, "raise") for step in steps for rank in (0, 1)]
    raised.append(("export", "renaming into place", 0, "raise"))
    full_disk = [("export", "writing headers", 0, "fsize"), ("save_sharded", "writing data", 0, "fsize"),
                 ("save_sharded", "writing data", 1, "fsize")]
    return raised + full_disk


def test_a_fault_on_any_rank_at_any_step_ends_every_rank_with_the_old_checkpoint_intact(launched):
    out = launched.faults  # mistral-untied, written by one rank before the launch
    cases = _fault_cases()
    every = launched.launches.result("faults")[0]
    for i, (writer, step, victim, how) in enumerate(cases):
        for rank, outcomes in enumerate(every):
            seconds, error = outcomes[i]
            assert error is not None, f"{writer} with a fault on rank {victim} while {step}: rank {rank} succeeded"
            assert f"rank {victim} failed while {step}" in error, error
            assert ("File too large" if how == "fsize" else "injected fault") in error, error
            assert seconds < 10, f"rank {rank} took {seconds:.1f}s to learn of the failure"
    assert digest(out) == launched.before_faults, "the previous checkpoint changed"
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"], "a temporary directory was left behind"


def test_export_writes_every_byte_once_when_kv_heads_are_replicated(checkpoints, launched):
    src = checkpoints["llama-untied"]  # 9 query / 3 KV heads: at TP=4 each KV head sits on several ranks
    written = launched.launches.result("export at tp=4")[0]
    with Checkpoint(src) as ck:
        total = sum(math.prod(e.shape) * e.dtype.itemsize for e in ck.entries.values())
    assert sum(written) == total, f"ranks wrote {written} bytes, the checkpoint has {total}"
    assert_same_checkpoint(src, launched.exported)


def test_sharded_checkpoint_stores_each_element_once(checkpoints, launched):
    src = checkpoints["llama-untied"]  # at TP=4 KV heads are replicated at different offsets of the ranks' qkv
    launched.launches.result("sharded at tp=4")
    ck = ShardedCheckpoint(launched.sharded_tp4)
    stored = [p.box for pieces in ck.stored.values() for p in pieces]
    assert sum(b.numel for b in stored) == sum(math.prod(shape) for shape, _ in ck.tensors.values()), \
        "an element is stored more than once, or not at all"
    expected = load_weights(src, progress=False).tensors
    assert all(torch.equal(load_weights(launched.sharded_tp4, progress=False).tensors[n], t)
               for n, t in expected.items())


# --- chat templates: untrusted code ------------------------------------------------------------------------------

ESCAPE = "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}"


def test_a_sandbox_escaping_template_does_not_run(with_tokenizer, tmp_path):  # noqa: F811
    ckpt = Path(shutil.copytree(with_tokenizer, tmp_path / "ckpt"))
    marker = tmp_path / "pwned"
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": ESCAPE.replace("MARKER", str(marker))}))
    with pytest.raises(TemplateError, match="sandbox forbids"):
        Text(ckpt).chat_prompt("hi")
    out = shardwise("generate", str(ckpt), "--chat", "--prompt", "t1", "--max-new-tokens", "1")
    assert out.returncode != 0 and "sandbox forbids" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not marker.exists(), "the template ran a shell command"


def test_chat_works_on_a_checkpoint_saved_by_transformers(with_tokenizer, tmp_path):  # noqa: F811
    import transformers

    ckpt = Path(shutil.copytree(with_tokenizer, tmp_path / "ckpt"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), eos_token="t2")
    tok.chat_template = ("{% for m in messages %}t5 {{ m['content'] }} t6 {% endfor %}"
                         "{{ 't7' if add_generation_prompt }}")
    tok.save_pretrained(ckpt)
    assert (ckpt / "chat_template.jinja").exists(), "transformers saved the template elsewhere"
    chat = [{"role": "user", "content": "t9"}]
    assert Text(ckpt).chat_prompt("t9") == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    out = shardwise("generate", str(ckpt), "--chat", "--prompt", "t9", "--max-new-tokens", "2")
    assert out.returncode == 0, out.stderr
    resharded = tmp_path / "s"
    assert shardwise("reshard", str(ckpt), str(resharded), "--tp", "2").returncode == 0
    assert shardwise("export", str(resharded), str(tmp_path / "hf")).returncode == 0
    for d in (resharded, tmp_path / "hf"):
        assert (d / "chat_template.jinja").read_text() == (ckpt / "chat_template.jinja").read_text()


# --- untrusted indexes and manifests -----------------------------------------------------------------------------

def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_index_pointing_outside_its_directory(checkpoints, tmp_path, name):
    ckpt = Path(shutil.copytree(checkpoints["llama-untied"], tmp_path / "ckpt"))
    shutil.copy(next(ckpt.glob("model-00001-*")), tmp_path / "outside.safetensors")
    (ckpt / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    _edit_json(ckpt / "model.safetensors.index.json", lambda d: d["weight_map"].update({"model.norm.weight": name}))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight': file name .* (points|leads) outside"):
        load_weights(ckpt, progress=False)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_manifest_pointing_outside_its_directory(sharded, tmp_path, name):
    ckpt = Path(shutil.copytree(sharded, tmp_path / "s"))
    shutil.copy(ckpt / "rank-00001.safetensors", tmp_path / "outside.safetensors")
    (ckpt / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    _edit_json(ckpt / "shardwise.json", lambda d: d["files"][1].update(file=name))
    with pytest.raises(CheckpointError, match=r"files\[1\]\.file: file name .* (points|leads) outside"):
        load_weights(ckpt, progress=False)


def _drop_piece(manifest: dict) -> None:
    pieces = manifest["files"][1]["pieces"]
    pieces[:] = [p for p in pieces if p["source"] != "model.layers.0.mlp.down_proj.weight"]


def _overflow(manifest: dict) -> None:
    piece = next(p for p in manifest["files"][0]["pieces"] if p["source"] == "model.norm.weight")
    piece["stop"] = [piece["stop"][0] + 1]


def _stored_too_small(manifest: dict) -> None:
    piece = next(p for p in manifest["files"][0]["pieces"] if p["source"] == "model.layers.0.mlp.down_proj.weight")
    piece["offset"] = [0, 7]


@pytest.mark.parametrize("edit,match", [
    (_drop_piece, r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' is not fully stored: no piece covers index"),
    (_overflow, r"tensor 'model\.norm\.weight': files\[0\]\.pieces\[\d+\] spans .* does not fit its shape"),
    (_stored_too_small,
     r"rank-00000\.safetensors: tensor '.*down_proj\.weight@0,0' has shape \[64, 50\], too small for the piece"),
    (lambda m: m["files"][0].update(pieces="all"), r"field 'files\[0\]\.pieces' is str 'all', expected list"),
    (lambda m: m["layout"].update(tp="2"), r"field 'layout\.tp' is str '2', expected int"),
    (lambda m: m["tensors"]["model.norm.weight"].update(dtype="F7"), r"tensor 'model\.norm\.weight': .*'F7'"),
    (lambda m: m["files"][0]["pieces"][0].pop("start"), r"field 'files\[0\]\.pieces\[0\]\.start' is missing"),
    (lambda m: m.update(files={}), r"field 'files' is dict"),
])
def test_bad_manifest_is_a_checkpoint_error(sharded, tmp_path, edit, match):
    ckpt = Path(shutil.copytree(sharded, tmp_path / "s"))
    _edit_json(ckpt / "shardwise.json", edit)
    with pytest.raises(CheckpointError, match=match):
        load_weights(ckpt, Layout(1, 1), progress=False)


def test_piece_dtype_must_match_the_manifest(sharded, tmp_path):
    ckpt = Path(shutil.copytree(sharded, tmp_path / "s"))
    _edit_json(ckpt / "shardwise.json", lambda m: m["tensors"]["model.norm.weight"].update(dtype="BF16"))
    with pytest.raises(CheckpointError, match=r"has dtype F32, but the manifest says 'model\.norm\.weight' is BF16"):
        load_weights(ckpt, Layout(1, 1), progress=False)


# --- quiet logs ----------------------------------------------------------------------------------------------------

def test_no_progress_bar_debris_when_not_on_a_terminal(checkpoints, tmp_path):
    out = shardwise("reshard", str(checkpoints["llama-untied"]), str(tmp_path / "s"), "--tp", "2")
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "it/s" not in out.stderr, out.stderr
    assert load_spec(tmp_path / "s") == load_spec(checkpoints["llama-untied"])
    assert os.listdir(tmp_path) == ["s"]


# --- the rename itself: races, fallbacks, symlinks, mounts -------------------------------------------------------

def _write(out: Path, text: str, **kwargs) -> Path:
    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(text)
        (tmp / "model.safetensors").write_text(text)

    return write_checkpoint(out, [("writing data", fill)], **kwargs)


def _content(out: Path) -> str:
    return (out / "config.json").read_text()


def test_overwrite_without_atomic_exchange(tmp_path, monkeypatch):
    import shardwise.io.publish as pub

    monkeypatch.setattr(pub, "_renameat2", lambda a, b, flags: False)  # NFS: no renameat2 flags
    out = _write(tmp_path / "out", "old")
    _write(out, "new", overwrite=True)
    assert _content(out) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_write_killed_between_the_fallback_renames_leaves_it_all_to_the_next_write(tmp_path):
    """Without RENAME_EXCHANGE the old checkpoint is moved aside, then the new one moved in. Killed in between, the
    target is gone and both wait in hidden directories; the next write's cleanup finds them and puts the old
    checkpoint back (so a write without --overwrite is refused), and nothing hidden is left."""
    out = tmp_path / "out"
    killed = (
        WRITER +
        "out = Path(sys.argv[1])\nwrite_checkpoint(out, write('old'))\n"
        "pub._renameat2 = lambda a, b, flags: False  # NFS: no renameat2 flags\n"
        "rename = os.rename\n"
        "def killed_before_the_new_moves_in(a, b):\n"
        "    if Path(b) == out and Path(a).name.startswith(pub.TMP_PREFIX):\n"
        "        os._exit(9)\n"
        "    rename(a, b)\n"
        "pub.os.rename = killed_before_the_new_moves_in\n"
        "write_checkpoint(out, write('new'), overwrite=True)\n")
    assert python_run([sys.executable, "-c", killed, str(out)], capture_output=True, text=True,
                      timeout=120).returncode == 9
    assert not out.exists() and len([p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]) == 2
    with pytest.raises(OSError, match="a checkpoint is already there; pass --overwrite"):
        _write(out, "newer")
    assert _content(out) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    _write(out, "newer", overwrite=True)
    assert _content(out) == "newer"


def test_failed_rename_without_exchange_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    import shardwise.io.publish as pub

    out = _write(tmp_path / "out", "old")
    monkeypatch.setattr(pub, "_renameat2", lambda a, b, flags: False)
    real = os.rename

    def failing(a, b):
        if Path(a).name.startswith(TMP_PREFIX) and Path(b) == out:
            raise OSError(5, "injected I/O error")
        real(a, b)

    monkeypatch.setattr(pub.os, "rename", failing)
    with pytest.raises(OSError, match="failed while renaming into place: OSError: .*injected I/O error"):
        _write(out, "new", overwrite=True)
    assert _content(out) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither the new one nor the parking place is left


def test_a_checkpoint_that_appears_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    import shardwise.io.collective_write as cw

    out, real = tmp_path / "out", cw.seal

    def seal_then_race(tmp, target, overwrite, sources, kind):
        mode = real(tmp, target, overwrite, sources, kind)  # the target was absent when checked...
        shutil.copytree(tmp, target)  # ...and another writer publishes before our rename
        (target / "config.json").write_text("theirs")
        return mode

    monkeypatch.setattr(cw, "seal", seal_then_race)
    with pytest.raises(OSError, match="failed while renaming into place"):
        _write(out, "ours")
    assert _content(out) == "theirs"


@pytest.mark.parametrize("kind", ["symlink", "mount"])
def test_symlink_and_mount_point_targets_are_refused(tmp_path, monkeypatch, kind):
    real = _write(tmp_path / "real", "old")
    if kind == "symlink":
        target = tmp_path / "link"
        target.symlink_to(real)
        match = "is a symbolic link"
    else:
        target = real
        monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == real)
        match = "is a mount point"
    with pytest.raises(TargetError, match=match):
        _write(target, "new", overwrite=True)
    assert _content(real) == "old"


def test_without_proc_no_writer_is_presumed_dead(tmp_path, monkeypatch):
    import shardwise.io.publish as pub

    stale = tmp_path / f"{TMP_PREFIX}out-abc"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(json.dumps(_owner(tmp_path / "out") | {"pid": 2**22 + 1}))
    monkeypatch.setattr(pub, "_proc_start", lambda pid: "")
    pub.remove_stale_temps(tmp_path / "out")
    assert stale.exists()


# --- more hostile inputs ------------------------------------------------------------------------------------------

def test_a_fifo_in_place_of_a_weight_file_is_refused_not_waited_on(checkpoints, tmp_path):
    ckpt = Path(shutil.copytree(checkpoints["llama-tied"], tmp_path / "ckpt"))
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: is not a regular file"):
        load_weights(ckpt, progress=False)


@pytest.mark.parametrize("what", ["header", "index", "manifest", "config"])
def test_deeply_nested_json_is_a_clean_error(checkpoints, sharded, tmp_path, what):
    deep = "[" * 100_000
    if what == "manifest":
        ckpt = Path(shutil.copytree(sharded, tmp_path / "c"))
        (ckpt / "shardwise.json").write_text(deep)
    else:
        ckpt = Path(shutil.copytree(checkpoints["llama-untied"], tmp_path / "c"))
        if what == "header":
            f = next(ckpt.glob("model-00001-*"))
            raw = f.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            f.write_bytes(len(deep).to_bytes(8, "little") + deep.encode() + raw[8 + n :])
        else:
            (ckpt / ("config.json" if what == "config" else "model.safetensors.index.json")).write_text(deep)
    with pytest.raises((CheckpointError, SpecError), match="RecursionError"):
        load_weights(ckpt, progress=False)


@pytest.mark.parametrize("template", ["{{ 1/0 }}", "{{ 1 + 'a' }}", "{% for %}"])
def test_a_broken_template_is_a_template_error(with_tokenizer, tmp_path, template):  # noqa: F811
    ckpt = Path(shutil.copytree(with_tokenizer, tmp_path / "ckpt"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(TemplateError, match="the chat template failed"):
        Text(ckpt).chat_prompt("hi")


def _set_rope_theta(cfg: dict, value) -> None:
    (cfg.get("rope_parameters") or cfg)["rope_theta"] = value


@pytest.mark.parametrize("name,edit,match", [
    ("mistral-untied", lambda c: c.update(tie_word_embeddings="false"),
     "field 'tie_word_embeddings' is str 'false', expected true"),
    ("mistral-untied", lambda c: _set_rope_theta(c, float("nan")),
     "field 'rope_theta' is float nan, expected a positive number"),
    ("mistral-untied", lambda c: c.update(num_key_value_heads=0),
     "field 'num_key_value_heads' is int 0, expected a positive integer"),
    ("mistral-untied", lambda c: c.update(sliding_window="big"),
     "field 'sliding_window' is str 'big', expected a positive integer"),
    ("phi3-untied", lambda c: c["rope_parameters"].update(short_factor=[1.0] * 8),
     r"field 'rope_parameters.short_factor' is list \[1.0, .*\], expected a list of 6 positive numbers"),
    ("phi3-untied", lambda c: c["rope_parameters"]["long_factor"].__setitem__(0, float("inf")),
     "field 'rope_parameters.long_factor' is list .*, expected a list of 6 positive numbers"),
    ("phi3-untied", lambda c: c["rope_parameters"].update(rope_type="linear"),
     r"rope type str 'linear' is not supported for phi3 \(supported: default, longrope\)"),
    ("phi3-untied", lambda c: c["rope_parameters"].update(partial_rotary_factor=0.1),
     "field 'partial_rotary_factor' is 0.1: it rotates 1 of the 16 dims of a head, expected an even number"),
    ("olmo2-untied", lambda c: c.update(partial_rotary_factor=0.5),
     r"field 'partial_rotary_factor' is 0.5, but olmo2 rotates whole heads \(expected 1\)"),
])
def test_config_fields_of_the_wrong_type_are_refused(checkpoints, tmp_path, name, edit, match):
    ckpt = Path(shutil.copytree(checkpoints[name], tmp_path / "c"))
    _edit_json(ckpt / "config.json", edit)
    with pytest.raises(SpecError, match=match):
        load_spec(ckpt)


def test_sharded_integers_are_not_loaded_as_weights(sharded, tmp_path):
    ckpt = Path(shutil.copytree(sharded, tmp_path / "s"))
    _edit_json(ckpt / "shardwise.json", lambda m: m["tensors"]["model.norm.weight"].update(dtype="I32"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has dtype I32, expected one of"):
        load_weights(ckpt, progress=False)


def test_a_manifest_layout_that_does_not_fit_the_model_is_refused(sharded, tmp_path):
    ckpt = Path(shutil.copytree(sharded, tmp_path / "s"))
    _edit_json(ckpt / "shardwise.json", lambda m: m["layout"].update(tp=50000))
    out = shardwise("export", str(ckpt), str(tmp_path / "hf"))
    assert out.returncode != 0 and "field 'layout' does not fit the model: tp=50000 exceeds" in out.stderr, out.stderr
