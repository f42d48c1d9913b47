"""Prompts of different lengths, left-padded into one batch, give HF's batched answers and their own alone."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB
from workers import batched_generate

from shardwise import Layout, launch
from shardwise.model.forward import left_pad

LENGTHS = (3, 9, 17, 30)  # 30 crosses mistral's sliding window of 7 in prompt and generation alike
PROMPTS = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENGTHS]
DENSE = ("llama-untied", "mistral-tied")
SPARSE = ("qwen2_moe-untied", "mixtral-tied")  # mixtures of experts, under expert parallelism
CASES = [(layout, name) for layout in (Layout(tp=2), Layout(tp=2, pp=2)) for name in DENSE] + [
    (layout, name) for layout in (Layout(ep=2), Layout(tp=2, ep=2)) for name in SPARSE]
CASE_IDS = [f"{layout}-{name}".replace(" ", ",") for layout, name in CASES]
STEPS = 16
PAD = 0
_runs: dict[Layout, dict] = {}


def hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def eos_for(model) -> int:
    """Row 0's fourth greedy token, so that one row finishes early while the others keep going."""
    ids, mask = left_pad(PROMPTS, PAD)
    model.generation_config.eos_token_id = None
    free = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    return int(free[0, -1])


@pytest.fixture(scope="module")
def paths(checkpoints, moe_checkpoints) -> dict[str, str]:
    return {name: str(checkpoints[name] if name in DENSE else moe_checkpoints[name]) for name in DENSE + SPARSE}


@pytest.fixture(scope="module")
def references(paths) -> dict[str, dict]:
    """HF's masked logits (positions as its generate derives them) and batched greedy output, with an EOS id."""
    ids, mask = left_pad(PROMPTS, PAD)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = {}
    for name in paths:
        model = hf_model(paths[name])
        eos = eos_for(model)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions).logits
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                                    eos_token_id=eos, pad_token_id=PAD)
        out[name] = dict(logits=logits, tokens=tokens, eos=eos)
    return out


def run_layout(layout: Layout, paths, references) -> dict:
    """One launch per layout serves its checkpoints: spawning ranks is the slow part."""
    if layout not in _runs:
        names = [name for case, name in CASES if case == layout]
        eos = {name: references[name]["eos"] for name in names}
        _runs[layout] = launch(batched_generate, layout.world_size, layout, {name: paths[name] for name in names},
                               PROMPTS, STEPS, eos, PAD, timeout=300)
    return _runs[layout]


@pytest.mark.parametrize("layout,name", CASES, ids=CASE_IDS)
def test_masked_logits_match_hf_on_real_tokens(layout, name, paths, references):
    ref = references[name]["logits"]
    logits = run_layout(layout, paths, references)[name]["logits"]
    real = left_pad(PROMPTS, PAD)[1].bool()
    assert logits.shape == ref.shape
    err = (logits[real] - ref[real]).abs().max().item()
    scale = ref[real].abs().max().item()
    assert err <= 1e-4 * scale, f"{name} {layout}: max abs diff {err:.3g} vs max |logit| {scale:.3g}"


@pytest.mark.parametrize("layout,name", CASES, ids=CASE_IDS)
def test_batched_generation_matches_hf(layout, name, paths, references):
    """A list of prompts and the same batch as padded tensor plus mask both give HF's padded output."""
    ref = references[name]["tokens"]
    out = run_layout(layout, paths, references)[name]
    assert torch.equal(out["batched"], ref), f"{name} {layout}: batched greedy tokens differ from HF"
    assert torch.equal(out["from_tensor"], ref)
    assert (ref[0, -1] == PAD) and (ref[1:, -1] != PAD).any(), "the test wants one row to finish early"


@pytest.mark.parametrize("layout,name", CASES, ids=CASE_IDS)
def test_each_row_equals_its_prompt_alone(layout, name, paths, references):
    """Padding changes nothing about a row: it continues as alone, then (after its EOS) with the pad id."""
    out = run_layout(layout, paths, references)[name]
    longest = max(LENGTHS)
    for row, alone, n in zip(out["batched"], out["alone"], LENGTHS, strict=True):
        assert (row[: longest - n] == PAD).all()
        mine = row[longest - n :]
        assert torch.equal(mine[: len(alone)], alone), f"{name} {layout}: prompt of {n} tokens differs"
        assert (mine[len(alone) :] == PAD).all()


def test_padding_rules(checkpoints):
    """Equal lengths take the unpadded path unchanged; right padding and a mask beside a list are refused."""
    from shardwise import load_model

    with load_model(checkpoints["llama-untied"], progress=False) as model:
        same = torch.tensor([PROMPTS[1], PROMPTS[1][::-1]])
        assert torch.equal(model.generate(same.tolist(), 4), model.generate(same, 4))
        ids, mask = left_pad(PROMPTS[:2], PAD)
        with pytest.raises(ValueError, match="left padding"):
            model.generate(ids, 4, attention_mask=mask.flip(-1))
        with pytest.raises(ValueError, match="list of prompts"):
            model.generate(PROMPTS, 4, attention_mask=mask)


def test_a_flat_list_or_foreign_ids_are_refused(checkpoints):
    from shardwise import load_model

    with load_model(checkpoints["llama-tied"], progress=False) as model:
        with pytest.raises(ValueError, match="for a single prompt pass \\[ids\\]"):
            model.generate([5, 17, 42], 2)
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 131\), got 5\.\.131"):
            model.generate([[5, 131]], 2)
