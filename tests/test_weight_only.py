"""int8 weight-only inference: projections quantized per output row at load, computed with int8 weights.

The reference is HF's model with the same linear weights quantized the same way (``quantize``, then
dequantized in fp32): shardwise must compute what it computes, at every TP degree, since a scale per
output row leaves TP nothing to change.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPT, STEPS
from safetensors.torch import load_file
from weight_only_workers import int8_runs

from shardwise import Layout, launch
from shardwise.cli.plan import plan_table
from shardwise.io.loader import Provide
from shardwise.io.reader import CheckpointError
from shardwise.model.weight_only import BLOCK_ROWS, int8_linear, quantize

NAMES = ["llama-tied", "llama-untied", "qwen3-untied", "mistral-untied"]
LAYOUTS = [(Layout(), False), (Layout(tp=2), False), (Layout(tp=3), False), (Layout(tp=2), True)]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_int8(path: Path, head: bool):
    """HF's fp32 model with its projections (and LM head, if ``head``) replaced by their per-row int8 values
    dequantized: the weights shardwise computes with."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in LINEARS or (head and name == "lm_head"):
                if head and name == "lm_head" and model.config.tie_word_embeddings:
                    module.weight = torch.nn.Parameter(module.weight.detach().clone())  # untie: the head alone
                module.weight.copy_(quantize(module.weight).dequantize(torch.float32))
    return model


@pytest.fixture(scope="module")
def hf(checkpoints) -> dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]]:
    """HF's int8 logits and greedy tokens per checkpoint, head quantized or not, computed once."""
    out = {}
    for name in NAMES:
        for head in (False, True):
            model = hf_int8(checkpoints[name], head)
            with torch.no_grad():
                logits = model(PROMPT).logits
                tokens = model.generate(PROMPT, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
            out[name, head] = logits, tokens
    return out


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory) -> dict:
    exports = tmp_path_factory.mktemp("int8-export")
    paths = {name: str(checkpoints[name]) for name in NAMES}
    out = {}
    for layout, head in LAYOUTS:
        wanted = {name: str(exports / f"{name}-{layout.tp}-{head}") for name in NAMES} if layout.tp == 2 else {}
        out[layout, head] = launch(int8_runs, layout.world_size, layout, paths, PROMPT, STEPS, head, wanted)
    return out


@pytest.mark.parametrize("layout,head", LAYOUTS, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_int8_logits_and_tokens_equal_hf_with_the_same_int8_weights(runs, hf, name, layout, head):
    got = runs[layout, head][name]
    logits, tokens = hf[name, head]
    torch.testing.assert_close(got["logits"], logits, rtol=0, atol=2e-5)
    assert torch.equal(got["tokens"], tokens), (got["tokens"], tokens)


@pytest.mark.parametrize("layout,head", LAYOUTS, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_plan_shows_the_bytes_the_provider_holds(checkpoints, runs, name, layout, head):
    """``shardwise plan --weight-only int8``'s total for rank 0 is what its provider holds."""
    table = plan_table(str(checkpoints[name]), layout, torch.float32, Provide(weight_only="int8", quantize_head=head))
    total_mb = float(table.splitlines()[2].split()[-2])
    assert math.isclose(total_mb, sum(runs[layout, head][name]["bytes"].values()) / 1e6, abs_tol=0.006), table


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in Path(directory).glob("*.safetensors"):
        out |= load_file(f)
    return out


def assert_dequantized(exported: dict[str, torch.Tensor], original: dict[str, torch.Tensor], head: bool) -> None:
    """Each projection (and the head, if ``head``) is its int8 values times its scales in the checkpoint's dtype;
    the other tensors are the checkpoint's own."""
    assert exported.keys() == original.keys()
    for key, w in original.items():
        quantized = key.split(".")[-2] in LINEARS or (head and key == "lm_head.weight")
        want = quantize(w.float()).dequantize(torch.float32).to(w.dtype) if quantized else w
        assert torch.equal(exported[key], want), key


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_export_writes_the_dequantized_weights(checkpoints, runs, tmp_path_factory, name, head):
    """Exported from TP 2, in the checkpoint's dtype."""
    exported = hf_tensors(tmp_path_factory.getbasetemp() / "int8-export0" / f"{name}-2-{head}")
    assert_dequantized(exported, hf_tensors(checkpoints[name]), head)


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("name", ["llama-tied", "qwen3-untied"])
def test_a_sharded_int8_checkpoint_reshards_bit_exact_and_loads_int8(checkpoints, runs, tmp_path_factory, tmp_path,
                                                                     name, head):
    """Saved sharded at TP 2 (int8 values and per-row scales as they are), resharded to TP 3 and then to TP 1 by
    the CLI, and exported: still the same int8 values and scales. Loaded without weight_only it is refused."""
    from shardwise import load_model
    from shardwise.cli import main

    saved = tmp_path_factory.getbasetemp() / "int8-export0" / f"{name}-2-{head}-sharded"
    main(["reshard", str(saved), str(tmp_path / "tp3"), "--tp", "3"])
    main(["reshard", str(tmp_path / "tp3"), str(tmp_path / "tp1")])
    main(["export", str(tmp_path / "tp1"), str(tmp_path / "hf")])
    assert_dequantized(hf_tensors(tmp_path / "hf"), hf_tensors(checkpoints[name]), head)
    with pytest.raises(ValueError, match="holds int8 weight-only weights: load it with weight_only='int8'"):
        load_model(tmp_path / "tp1", progress=False)


@pytest.mark.parametrize("rows,cols", [(5, 7), (BLOCK_ROWS + 3, 16)])
def test_quantize_keeps_every_element_within_half_a_step(rows, cols):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * torch.rand(rows, 1) * 10
    w[1] = 0  # an all-zero row: zero values, zero scale
    q = quantize(w)
    assert q.q.dtype == torch.int8 and int(q.q.abs().max()) == 127 and q.scale.shape == (rows,)
    assert q.scale[1] == 0 and not q.q[1].any()
    err = (q.dequantize(torch.float32) - w).abs()
    assert bool((err <= q.scale[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("dtype,tol,width", [(torch.float32, 1e-5, 64), (torch.bfloat16, 2e-2, 64),
                                             (torch.bfloat16, 2e-2, 12), (torch.float16, 2e-3, 12)])
def test_int8_linear_computes_the_dequantized_matmul(dtype, tol, width):
    """torch's int8 kernel (16-bit inputs on CPU, widths a multiple of 8) and the blockwise fallback (fp32, and
    widths an uneven TP split gives, where the kernel would crash the process) give the matmul with the
    dequantized weight, over more rows than one block."""
    g = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(BLOCK_ROWS + 5, width, generator=g).to(dtype))
    x, bias = torch.randn(3, 2, width, generator=g).to(dtype), torch.randn(BLOCK_ROWS + 5, generator=g).to(dtype)
    want = F.linear(x.float(), w.dequantize(torch.float32), bias.float())
    torch.testing.assert_close(int8_linear(x, w, bias).float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_quality_on_the_demo_model_matches_hfs_per_row_int8(smollm2):
    """On SmolLM2 and a text of ours, the KL divergence of int8 weight-only logits from fp32 ones is within 1.2x of
    HF's model with its projections quantized per row the same way."""
    import transformers

    _, path = smollm2
    text = ("The lighthouse keeper wrote down the weather every evening: wind from the west, a falling glass, "
            "and fishing boats coming home early before the storm reached the harbour.")
    ids = transformers.AutoTokenizer.from_pretrained(path)(text, return_tensors="pt").input_ids
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        base = fp32(ids).logits.log_softmax(-1)
        theirs = hf_int8(path, False)(ids).logits.log_softmax(-1)
    ours = launch(_smol_logits, 1, str(path), ids).log_softmax(-1)

    def kl(p: torch.Tensor) -> float:
        return F.kl_div(p, base, log_target=True, reduction="none").sum(-1).mean().item()

    assert 0 < kl(ours) <= 1.2 * kl(theirs), (kl(ours), kl(theirs))


def _smol_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from shardwise import load_model

    with load_model(path, progress=False, weight_only="int8") as model:
        return model(ids)


def test_weight_only_is_refused_where_it_means_nothing(checkpoints, tmp_path, capsys):
    """With ZeRO-3 (which quantizes its gathers instead), without --weight-only, and in training (not a flag)."""
    from shardwise.cli import main

    path = str(checkpoints["llama-untied"])
    with pytest.raises(SystemExit, match="--weight-only needs --provider resident"):
        main(["generate", path, "--provider", "zero3", "--weight-only", "int8", "--prompt", "hi"])
    with pytest.raises(SystemExit, match="--quantize-head needs --weight-only"):
        main(["plan", path, "--quantize-head"])
    with pytest.raises(SystemExit):
        main(["train", path, "--weight-only", "int8", "--data", str(tmp_path / "t.txt"), "--steps", "1", "--save",
              str(tmp_path / "run")])
    assert "unrecognized arguments: --weight-only" in capsys.readouterr().err


def test_a_manifest_that_lies_about_int8_is_refused(checkpoints, runs, tmp_path_factory, tmp_path):
    """A tensor the manifest calls int8 weight-only that is stored as float, one stored as int8 that it does not
    call so, and a dtype that is no name are refused, by name, before any data is read."""
    import json
    import shutil

    from shardwise.io.sharded import ShardedCheckpoint
    from shardwise.plan.spec import load_spec

    saved = tmp_path_factory.getbasetemp() / "int8-export0" / "llama-untied-2-False-sharded"
    spec = load_spec(checkpoints["llama-untied"])
    for lie, match in (("float", r"'model.norm.weight' is F32 \[72\]: as int8 weight-only it must be I8"),
                       ("unlisted", r"'model.layers.0.mlp.down_proj.weight' has dtype I8, expected one of"),
                       ("not a name", r"weight_only.dtypes: tensor 'x' has dtype list \[\], expected one of")):
        copy = tmp_path / lie
        shutil.copytree(saved, copy)
        manifest = json.loads((copy / "shardwise.json").read_text())
        dtypes = manifest["weight_only"]["dtypes"]
        if lie == "float":
            dtypes["model.norm.weight"] = "F32"
        elif lie == "unlisted":
            del dtypes["model.layers.0.mlp.down_proj.weight"]
        else:
            dtypes["x"] = []
        (copy / "shardwise.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match=match):
            ShardedCheckpoint(copy).check(spec)
