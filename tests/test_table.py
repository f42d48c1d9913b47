"""A tensor kind added through the architecture table alone is loaded, computed with, trained and exported.

The kind is Llama's o_proj bias (``attention_bias``): with its entry taken out of the table, the checkpoint's
o_proj biases are ignored and the logits are wrong; with the one entry written back, and no other code touched,
shardwise computes HF's logits and tokens, exports the checkpoint bit-exact and trains as HF does, at TP 1 and 2.
"""

from __future__ import annotations

import logging

import pytest
import torch
import train_workers as tw
from conftest import PROMPT, STEPS, hf_config, hf_reference
from safetensors.torch import load_file
from table_workers import add_o_bias, drop_o_bias, run_with_o_bias

from shardwise import launch, load_model


@pytest.fixture(scope="module")
def o_bias_checkpoint(tmp_path_factory):
    """A Llama model with attention biases (random, so they matter), saved by HF."""
    import transformers

    torch.manual_seed(7)
    config = hf_config("llama", False)
    config.attention_bias = True
    model = transformers.AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.self_attn.o_proj.bias, std=0.5)
    path = tmp_path_factory.mktemp("o-bias") / "llama-o-bias"
    model.save_pretrained(path)
    return path


@pytest.fixture
def table(monkeypatch):
    """The architecture tables, restored after the test."""
    from shardwise.plan.archs import ARCHS

    monkeypatch.setitem(ARCHS, "llama", ARCHS["llama"])


def test_without_the_entry_the_bias_is_ignored_with_a_warning(o_bias_checkpoint, caplog, table):
    drop_o_bias()
    with caplog.at_level(logging.WARNING), load_model(o_bias_checkpoint, progress=False) as model:
        logits = model(PROMPT)
    assert "tensors are not part of the model and are ignored, e.g. model.layers.0.self_attn.o_proj.bias" in caplog.text
    ref_logits, _ = hf_reference(o_bias_checkpoint, PROMPT, 0)
    assert (logits - ref_logits).abs().max() > 1e-2 * ref_logits.abs().max()


@pytest.mark.parametrize("tp", [1, 2])
def test_one_table_entry_loads_trains_and_exports_it(o_bias_checkpoint, tmp_path, table, tp):
    add_o_bias()
    out = tmp_path / "export"
    args = (str(o_bias_checkpoint), PROMPT, STEPS, str(out), tp, tw.hf_run(str(o_bias_checkpoint), None))
    found = run_with_o_bias(*args) if tp == 1 else launch(run_with_o_bias, tp, *args, timeout=600)
    ref_logits, ref_tokens = hf_reference(o_bias_checkpoint, PROMPT, STEPS)
    assert (found["logits"] - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    assert torch.equal(found["tokens"], ref_tokens)
    source, written = load_file(o_bias_checkpoint / "model.safetensors"), {}
    for f in out.glob("*.safetensors"):
        written |= load_file(f)
    assert written.keys() == source.keys() and all(torch.equal(written[k], source[k]) for k in source)
    for rank, o in found["train"].items():
        assert o["loss"] <= 1e-5 and o["norm"] <= 1e-5 and o["weights"] <= 1e-4, (rank, o)
