"""Every layout computes what HF transformers computes, for every architecture, tied or not."""

from __future__ import annotations

import pytest
import torch
from conftest import CHECKPOINTS, PROMPT, STEPS
from shared_launch import SharedLaunches, with_env
from workers import forward_and_generate, sample_on_every_rank

LAYOUTS = [(tp, pp) for pp in (1, 2) for tp in (1, 2, 3, 4)]
GLOO = ("qwen2-untied", "mistral-tied")  # run again at tp=3 x pp=2 with SHARDWISE_SHM=0
SP_LAYOUTS = [(2, 1), (3, 1), (2, 2)]  # sequence parallel: the prompt's 11 tokens split unevenly, decode's 1 too
# every architecture once, tied and untied alternating (OLMo-2's attention biases follow a row-parallel layer)
SP_CHECKPOINTS = ("llama-tied", "mistral-untied", "qwen2-tied", "qwen3-untied", "phi3-tied", "olmo2-untied")


@pytest.fixture(scope="module")
def runs(checkpoints) -> SharedLaunches:
    """One launch per world size serves every layout of that size, all checkpoints and this module's other checks:
    spawning ranks is the slow part."""
    paths = {name: str(p) for name, p in checkpoints.items()}
    jobs = {("layout", tp, pp, name): (tp * pp, forward_and_generate, (tp, pp, {name: path}, PROMPT, STEPS))
            for tp, pp in LAYOUTS for name, path in paths.items()}
    sp = {name: paths[name] for name in SP_CHECKPOINTS}
    jobs |= {("sp", tp, pp): (tp * pp, forward_and_generate, (tp, pp, sp, PROMPT, STEPS, None, True))
             for tp, pp in SP_LAYOUTS}
    gloo = {name: paths[name] for name in GLOO}
    jobs["gloo",] = (6, with_env, ({"SHARDWISE_SHM": "0"}, forward_and_generate, 3, 2, gloo, PROMPT, STEPS))
    jobs["sampling",] = (4, sample_on_every_rank, (paths["qwen3-tied"], PROMPT))
    return SharedLaunches(jobs, timeout=600, local=False)  # tp=pp=1 too in a launched rank


def run_layout(tp: int, pp: int, name: str, runs: SharedLaunches) -> tuple:
    return runs.result(("layout", tp, pp, name))[0][name]


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_matches_hf(tp, pp, name, runs, references):
    ref_logits, ref_tokens = references[name]
    logits, tokens = run_layout(tp, pp, name, runs)
    assert logits.shape == ref_logits.shape
    err = (logits - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    assert err <= 1e-4 * scale, f"{name} tp={tp} pp={pp}: max abs diff {err:.3g} vs max |logit| {scale:.3g}"
    assert torch.equal(tokens, ref_tokens), f"{name} tp={tp} pp={pp}: greedy tokens differ from HF"


@pytest.mark.parametrize("tp,pp", SP_LAYOUTS)
def test_sequence_parallel_matches_hf(tp, pp, runs, references):
    """Prefill and greedy decode with each TP rank holding its share of the tokens between the TP blocks."""
    out = runs.result(("sp", tp, pp))[0]
    for name, (logits, tokens) in out.items():
        ref_logits, ref_tokens = references[name]
        err = (logits - ref_logits).abs().max().item()
        assert err <= 1e-4 * ref_logits.abs().max().item(), f"{name} tp={tp} sp pp={pp}: max abs diff {err:.3g}"
        assert torch.equal(tokens, ref_tokens), f"{name} tp={tp} sp pp={pp}: greedy tokens differ from HF"


def test_gloo_path_matches_shared_memory_path(runs, references):
    """The shared-memory all-reduce is an optimization: plain gloo (SHARDWISE_SHM=0 in the ranks) must give the same
    answers."""
    out = runs.result(("gloo",))[0]
    for name in GLOO:
        ref_logits, ref_tokens = references[name]
        logits, tokens = out[name]
        assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
        assert torch.equal(tokens, ref_tokens)


def test_sampling_is_identical_on_every_rank_and_stops_at_eos(checkpoints, runs):
    """Sampled tokens agree across TP and PP (same logits, same seed), and finished rows are padded with EOS."""
    per_rank = runs.result(("sampling",))[0]
    assert all(torch.equal(per_rank[0], other) for other in per_rank[1:])
    out = per_rank[0]
    new = out[0, PROMPT.shape[1]:].tolist()
    # Pretend that row 0's first sampled token not seen before (from the third on) ends its sequence.
    end = next((i for i in range(2, len(new) - 1) if new[i] not in new[:i]), None)
    if end is None:
        pytest.skip("row 0 sampled too few distinct tokens to place an EOS")
    eos, stop = new[end], PROMPT.shape[1] + end + 1
    from shardwise import load_model

    model = load_model(checkpoints["qwen3-tied"], progress=False)
    stopped = model.generate(PROMPT, 12, temperature=0.8, top_k=20, seed=7, eos_token_id=eos)
    assert torch.equal(stopped[0, :stop], out[0, :stop])
    assert (stopped[0, stop:] == eos).all(), "a finished row must be padded with EOS"


def test_generation_across_longrope_original_length_matches_hf_generate(checkpoints):
    """The prompt lies within Phi-3's longrope original length (16) and generation runs past it: the prompt's logits
    use the short factors, and at the step the sequence outgrows 16, HF's generate drops its cache and reruns the
    whole sequence with the long ones. shardwise's cached generation must choose the same at every step (keeping
    the short-rotated keys gives other tokens); the layouts above compare it with HF recomputing every step."""
    import transformers

    from shardwise import load_model

    path = checkpoints["phi3-untied"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref_logits = hf(PROMPT).logits
        ref_tokens = hf.generate(PROMPT, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    with load_model(path, progress=False) as model:
        assert PROMPT.shape[1] <= model.spec.rope.original_max_positions < ref_tokens.shape[1], "no crossing"
        logits, tokens = model(PROMPT), model.generate(PROMPT, STEPS)
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    assert torch.equal(tokens, ref_tokens)


FACTORS = dict(short_factor=[1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0], long_factor=[2.0, 3.0, 5.0, 8.0, 9.0, 10, 12, 16])
ROPES = {  # Phi-3 config.json fields (hidden 96, 6 heads: head_dim 16), as older and newer transformers write them
    "partial default": dict(partial_rotary_factor=0.5, rope_theta=5000.0),
    "longrope, 4.x spelling": dict(rope_scaling=dict(type="longrope", **FACTORS), original_max_position_embeddings=8,
                                   rope_theta=5000.0),
    "su, factor and attention factor given": dict(rope_scaling=dict(type="su", factor=3.0, attention_factor=1.25,
                                                                    **FACTORS), original_max_position_embeddings=8),
    "original length only in the rope parameters": dict(  # Phi-3's top-level default, 4096, outranks it
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=8,
                             **FACTORS), max_position_embeddings=8192),
    "partial longrope": dict(rope_parameters=dict(rope_type="longrope", partial_rotary_factor=0.75, rope_theta=1e4,
                                                  short_factor=[1.5] * 6, long_factor=[4.0] * 6),
                             original_max_position_embeddings=8),
}


@pytest.mark.parametrize("fields", ROPES.values(), ids=ROPES)
def test_phi3_rope_frequencies_and_scaling_are_hf_s(fields):
    """The frequencies and attention factor shardwise reads from a Phi-3 config.json are those HF's rotary embedding
    uses, bit for bit, for a forward within the original length and one beyond it."""
    import transformers

    from shardwise.plan.spec import spec_from_config

    config = dict(model_type="phi3", hidden_size=96, num_attention_heads=6, num_hidden_layers=1,
                  intermediate_size=8, vocab_size=16, max_position_embeddings=64) | fields
    rope = spec_from_config(config).rope
    hf = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(transformers.Phi3Config.from_dict(config))
    for length in (5, 9000):
        positions = torch.arange(length)
        hf(torch.zeros(1), positions[None])
        assert torch.equal(rope.inv_freq(16, long=rope.uses_long(positions)), hf.inv_freq), f"{length} positions"
        assert rope.attention_factor == hf.attention_scaling


@pytest.mark.parametrize("arch", ["llama", "phi3", "olmo2"])
def test_bf16_logits_are_hf_s_bit_for_bit(arch, tmp_path):
    """In bf16 every rounding shows, so one process must compute HF's logits exactly: OLMo-2 multiplies its norm gains
    in fp32 before the cast and rotates in fp32, Llama and Phi-3 cast first (the other order is 0.07 off). Without
    biases: a row-parallel bias is added after the TP sum, rounding once more than HF's fused one."""
    import transformers
    from conftest import hf_config, randomize_norms_and_biases

    from shardwise import load_model

    config = hf_config(arch, tied=False)
    config.attention_bias = False
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    randomize_norms_and_biases(model)
    model.save_pretrained(tmp_path / arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch, dtype=torch.bfloat16)  # rope in fp32
    with torch.no_grad():
        expected = hf(PROMPT).logits
    with load_model(tmp_path / arch, dtype=torch.bfloat16, progress=False) as shardwise_model:
        assert torch.equal(shardwise_model(PROMPT), expected)
