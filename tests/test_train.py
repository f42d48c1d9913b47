"""Training parity: 8 AdamW steps of shardwise on a TP x DP layout against HF trained in one process.

Fixed data (5 sequences per step, split unevenly over DP), fp32, the resident and the
ZeRO-3 provider. Every step's loss and gradient norm is within 1e-5 relative of HF's, and
after the last step every weight within 1e-4 of its tensor's max |w| (OLMo-2: 2e-4, see NOISY_WEIGHTS), on
every rank. One
more run per provider clips the gradient norm and accumulates micro-batches.
"""

from __future__ import annotations

import pytest
import torch
import train_workers as tw
from shared_launch import SharedLaunches, with_env

from shardwise import launch

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1)]  # (dp, tp)
# (pp, dp, tp, micro-batches per DP rank): 1F1B with more micro-batches than stages, and as many
PIPELINES = [(2, 1, 1, 3), (2, 2, 1, 2), (2, 1, 2, 2), (3, 1, 1, 3)]
PIPELINED = ("llama-tied", "qwen3-untied")  # the tied embedding on the first stage and the head on the last
# sequence parallel at TP 2 and 3 (9 tokens a sequence: uneven at TP 2), and with PP 2 x TP 2 in 1F1B
SEQUENCE_PARALLEL = [(1, 2, 1), (1, 3, 1), (2, 2, 2)]  # (pp, tp, micro-batches)
SP_CONFIGS = ("llama-tied", "qwen3-untied", "olmo2-untied")  # a tied head; per-head q/k norms; biases, post-norms
# q/k norms, 9/3 heads, odd vocab, ties; Phi-3's packed projections and longrope; OLMo-2's norms, split over TP
CONFIGS = ("qwen3-untied", "qwen2-tied", "mistral-untied", "llama-tied", "phi3-tied", "olmo2-untied")


WEIGHTS = 1e-4
# OLMo-2 normalizes each sublayer's output, which ignores the scale of the projection into it: down_proj's gradient
# cancels to rounding noise in places, and AdamW turns that noise into steps. HF's own fp32 run ends 9e-5 (of max
# |w|) from its fp64 run there, where Llama's ends 3e-5; shardwise's fp32 run ends within twice that noise.
NOISY_WEIGHTS = {"olmo2-untied": 2e-4}
PROVIDERS = ("resident", "zero3")
CLIP = 0.5  # below every first-step norm of these models: clipping acts from the first step
CLIPPED = ("qwen3-untied", "llama-tied")  # dp=2 x tp=2, 2 micro-batches, clipped
WORK_DTYPES = [None, torch.bfloat16, torch.float8_e4m3fn, torch.int8]
MEMORY = [  # (tp, dp, provider, work dtype, prefetch, offload): replicas, TP, zero3 as it is and offloaded
    (1, 2, "resident", None, 1, False),
    (2, 1, "resident", None, 1, False),
    (1, 2, "zero3", None, 1, False),
    (1, 2, "zero3", "bfloat16", 2, True),
]


@pytest.fixture(scope="module")
def runs(checkpoints) -> SharedLaunches:
    """Every training run of this module, one launch per world size (every mesh and provider of that size); HF's
    run of each checkpoint is computed once, here, and handed to the ranks."""
    jobs = {}
    for provider in PROVIDERS:
        for dp, tp in MESHES:
            for name in CONFIGS:
                path = str(checkpoints[name])
                jobs["train", provider, dp, tp, name] = (dp * tp, tw.train, (path, tp, dp, provider, None, 1,
                                                                             tw.hf_run(path, None)))
    for provider in PROVIDERS:
        for pp, dp, tp, micro in PIPELINES:
            for name in PIPELINED:
                path = str(checkpoints[name])
                jobs["pipeline", provider, pp, dp, tp, name] = (pp * dp * tp, tw.train, (
                    path, tp, dp, provider, None, micro, tw.hf_run(path, None), None, 1, pp))
    for provider in PROVIDERS:
        for pp, tp, micro in SEQUENCE_PARALLEL:
            for name in SP_CONFIGS if pp == 1 else SP_CONFIGS[:1]:  # with PP: the tied head, summed over stages
                path = str(checkpoints[name])
                jobs["sp", provider, pp, tp, name] = (pp * tp, tw.train, (
                    path, tp, 1, provider, None, micro, tw.hf_run(path, None), None, 1, pp, True))
    for provider in PROVIDERS:
        for name in CLIPPED:
            path = str(checkpoints[name])
            jobs["clip", provider, name] = (4, tw.train, (path, 2, 2, provider, CLIP, 2, tw.hf_run(path, CLIP)))
    jobs["work dtypes",] = (2, tw.zero3_losses_by_work_dtype, (str(checkpoints["qwen3-untied"]), WORK_DTYPES))
    # through gloo, whose work buffers and staging the plan gives (through shared memory the DP ranks share them)
    jobs["memory",] = (2, with_env, ({"SHARDWISE_SHM": "0"}, tw.step_memory, str(checkpoints["llama-tied"]), MEMORY))
    return SharedLaunches(jobs, timeout=600)


def check(found: dict, what: str, weights: float = WEIGHTS) -> None:
    for rank, out in found.items():
        assert out["loss"] <= 1e-5, f"{what} {rank}: losses {out['losses']} vs {out['expected']}"
        assert out["norm"] <= 1e-5, f"{what} {rank}: gradient norms off by {out['norm']} relative"
        assert out["weights"] <= weights, f"{what} {rank}: weight error {out['weights']} in {out['worst_at']}"
    losses = found["rank 0"]["losses"]
    assert losses[-1] < losses[0], f"{what}: the loss did not fall: {losses}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name,pp,tp,micro", [(name, *mesh) for mesh in SEQUENCE_PARALLEL
                                              for name in (SP_CONFIGS if mesh[0] == 1 else SP_CONFIGS[:1])], ids=str)
def test_sequence_parallel_training_matches_hf(runs, name, pp, tp, micro, provider):
    """8 steps with each TP rank holding its share of the tokens between the TP blocks equal HF's: the norms'
    gradients, partial per rank, are summed over TP."""
    check(runs.result(("sp", provider, pp, tp, name))[0], f"{name} {provider} pp={pp} tp={tp} sp",
          NOISY_WEIGHTS.get(name, WEIGHTS))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pp,dp,tp,micro", PIPELINES, ids=str)
@pytest.mark.parametrize("name", PIPELINED)
def test_pipeline_training_matches_hf(runs, name, pp, dp, tp, micro, provider):
    """8 steps over pipeline stages in 1F1B order equal HF's; a tied embedding's two copies (first and last stage)
    stay identical after every step (resident: ZeRO-3 cuts the two stages' blocks into other chunks)."""
    found = runs.result(("pipeline", provider, pp, dp, tp, name))[0]
    check(found, f"{name} {provider} pp={pp} dp={dp} tp={tp} micro={micro}")
    if name.endswith("-tied") and provider == "resident":
        copies: dict[tuple, set] = {}  # (dp, ep, tp) position -> the step-by-step digests of its two copies
        for out in found.values():
            if out["tied"] is not None:  # a stage in between holds neither
                copies.setdefault(out["tied_at"], set()).add(out["tied"])
        assert len(copies) == dp * tp and all(len(c) == 1 for c in copies.values()), copies


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dp,tp", MESHES, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_training_matches_hf(runs, name, dp, tp, provider):
    check(runs.result(("train", provider, dp, tp, name))[0], f"{name} {provider} dp={dp} tp={tp}",
          NOISY_WEIGHTS.get(name, WEIGHTS))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_clipping_and_accumulation_match_hf(runs, provider):
    """dp=2 x tp=2, each rank's sequences in 2 micro-batches, the norm clipped to 0.5 as torch's clip_grad_norm_."""
    for name in CLIPPED:
        out = runs.result(("clip", provider, name))[0]
        assert out["rank 0"]["clipped"], f"{name}: the norm never exceeded {CLIP}, so clipping went untested"
        check(out, f"{name} {provider} clip={CLIP} micro=2")


def test_clipped_norm_counts_a_kv_head_replicated_over_tp_once(tmp_path):
    """2 query heads over 1 KV head at tp 2: both TP ranks hold the KV head, and ZeRO-3 at dp 3 cuts their flat
    blocks (of different sizes: the odd ffn splits 51/50) at different edges, so the same k/v_proj elements sit
    in overlapping, unequal boxes (4096 elements owned twice by a per-region rule). The gradient norm
    must count them once: equal to resident dp 1's and to torch's clip_grad_norm_ on HF's gradients."""
    import transformers
    from conftest import VOCAB

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=101, num_hidden_layers=2, initializer_range=0.1)
    torch.manual_seed(7)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mqa")
    path = str(tmp_path / "mqa")
    expected = tw.hf_run(path, CLIP)
    single = tw.train(path, 1, 1, "resident", CLIP, expected=expected)["rank 0"]
    sharded = launch(tw.train, 6, path, 2, 3, "zero3", CLIP, 1, expected, timeout=600)
    for what, found in (("resident dp=1", {"rank 0": single}), ("zero3 tp=2 dp=3", sharded)):
        assert found["rank 0"]["clipped"], f"{what}: the norm never exceeded {CLIP}, so clipping went untested"
        check(found, what)
    assert sharded["rank 0"]["norms"] == pytest.approx(single["norms"], rel=1e-5)


def test_zero3_trains_in_any_work_dtype(runs):
    """fp32 masters, gathered and computed in bf16 (or gathered as fp8 / int8): the same descent as fp32 work, to
    the work dtype's precision; the quantized gathers re-derive their scales from the updated masters each step."""
    fp32, *others = runs.result(("work dtypes",))[0]
    assert fp32[-1] < fp32[0] - 1, fp32
    for dtype, losses in zip(WORK_DTYPES[1:], others):
        assert losses == pytest.approx(fp32, rel=2e-2), f"{dtype}: {losses} against fp32 work {fp32}"


def test_a_bf16_step_takes_its_loss_in_fp32(checkpoints):
    """bf16 work weights: the step's loss is the fp32 cross-entropy of the very bf16 logits it computed, summed in
    fp32 (HF upcasts its logits before the loss); each token's loss rounded to bf16 would be off by far more."""
    import torch
    import torch.nn.functional as F

    from shardwise import load_model
    from shardwise.train.optim import AdamW
    from shardwise.train.step import Trainer

    ids = tw.batch(0)
    tokens = ids[:, 1:].numel()
    logits = []
    # Whether rounding each token's loss shows depends on the data: mistral-untied's shows 4x the margin asked for.
    path = checkpoints["mistral-untied"]
    with load_model(path, provider="zero3", work_dtype=torch.bfloat16, progress=False) as model:
        head = model.head

        def spy(*args, **kwargs):
            out = head(*args, **kwargs)
            logits.append(out.detach())
            return out

        model.head = spy
        trainer = Trainer(model, AdamW(model.provider, **tw.HYPER))
        loss = trainer.step([ids], tokens).loss
        trainer.close()
    assert len(logits) == 1 and logits[0].dtype == torch.bfloat16
    per_token = F.cross_entropy(logits[0].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    exact = float(per_token.sum() / tokens)
    rounded = float(per_token.bfloat16().float().sum() / tokens)
    assert loss == pytest.approx(exact, rel=1e-6, abs=0)
    assert abs(rounded - exact) > 100 * 1e-6 * exact, "the data cannot tell fp32 from bf16-rounded losses"


def test_a_refused_step_changes_nothing(checkpoints):
    """AdamW refuses a step it could not finish (a missing gradient or one of another shape, a master not in fp32, a
    provider that cannot begin an update) before anything changes: the step count its bias correction uses, every
    master and every moment stay as they were, and the next good step counts as the next one."""
    import re

    import torch

    from shardwise import load_model
    from shardwise.providers.base import ProviderError
    from shardwise.train.optim import AdamW
    from shardwise.train.step import Trainer

    with load_model(checkpoints["qwen2-untied"], progress=False) as model:
        provider = model.provider
        optimizer = AdamW(provider, **tw.HYPER)
        trainer = Trainer(model, optimizer)
        trainer.step([tw.batch(0)], tw.BATCH * (tw.SEQ - 1))
        last = next(iter(provider.masters_at_rest("head")))  # updated last: checked per block, it is found too late
        good = {name: torch.ones_like(t) for name, t in trainer.target.grads.items()}

        def state() -> list[dict[str, torch.Tensor]]:
            held = (provider.tensors, *optimizer.moments.values())
            return [{n: t.clone() for n, t in tensors.items()} for tensors in held]

        def refused(error: type, message: str, grads: dict[str, torch.Tensor]) -> None:
            before = state()
            with pytest.raises(error, match=f"^rank 0: .*{re.escape(message)}"):
                optimizer.step(grads)
            assert optimizer.steps == 1, f"{message}: the refused step was counted"
            for kept, now in zip(before, state()):
                changed = [n for n in kept if not torch.equal(kept[n], now[n])]
                assert not changed, f"{message}: a refused step changed {changed}"

        refused(ValueError, f"block 'head': master {last!r}: its gradient is (3,)", good | {last: torch.ones(3)})
        refused(ValueError, f"block 'head': master {last!r} has no gradient",
                {n: g for n, g in good.items() if n != last})
        master = provider.tensors[last]
        provider.tensors[last] = master.bfloat16()
        refused(TypeError, f"block 'head': master {last!r} is torch.bfloat16, expected float32", good)
        provider.tensors[last] = master
        provider.gather("layers.1")
        refused(ProviderError, "begin_update() while layers.1 are gathered", good)
        provider.release("layers.1")
        before = state()[0]
        optimizer.step(good)
        assert optimizer.steps == 2
        assert all(not torch.equal(before[n], t) for n, t in provider.tensors.items()), "a good step left a master"
        trainer.close()


def test_offload_keeps_what_scales_with_the_masters_in_host_memory(checkpoints, monkeypatch):
    """With offload the fp32 masters, AdamW's moments and the gradient sums live in page-locked host memory; the
    device keeps the two fetch buffers, one block's moments and gradient, and the per-block gradient buffers. The
    meta device stands in for an accelerator: its tensors say where they would be, holding no bytes."""
    import torch

    import shardwise.providers.weights as weights
    from shardwise import Layout, load_weights
    from shardwise.dist.comm import Comm
    from shardwise.model.forward import Model
    from shardwise.providers.zero3 import Zero3
    from shardwise.train.optim import AdamW
    from shardwise.train.step import Trainer

    locked: list[torch.Tensor] = []

    def page_locked(nbytes: int) -> torch.Tensor:  # no accelerator here to lock pages for: note what would be
        locked.append(torch.zeros(nbytes, dtype=torch.uint8))
        return locked[-1]

    monkeypatch.setattr(weights, "page_locked", page_locked)
    w = load_weights(checkpoints["llama-tied"], dtype=torch.float32, progress=False, provider="zero3")
    meta = torch.device("meta")
    for offload in (False, True):
        locked.clear()
        provider = Zero3(w.plan, Comm(Layout(), 0), dict(w.buffers), None, 1, offload, meta)
        trainer = Trainer(Model(w, Comm(Layout(), 0), provider, meta), AdamW(provider))
        home = torch.device("cpu") if offload else meta
        assert (provider.state_device, provider.state_pinned) == (home, offload)
        scaled = {"gradient sums": trainer.target.flats, **trainer.target.optimizer.buffers}
        arenas = {t.untyped_storage().data_ptr() for t in locked}
        for role, tensors in scaled.items():
            assert {t.device for t in tensors.values()} == {home}, f"offload={offload}: {role}"
            pinned = {t.untyped_storage().data_ptr() in arenas for t in tensors.values()}
            assert pinned == {offload}, f"offload={offload}: {role} page-locked: {pinned}"
        assert len(locked) == (3 if offload else 0)
        on_device = [trainer.target.dp.full, *provider.fetch_buffers]
        on_device += [trainer.target.optimizer.staging] if offload else []
        assert {t.device for t in on_device} == {meta}
        assert trainer.target.optimizer.staging is None or trainer.target.optimizer.staging.shape == (3, max(
            t.numel() for t in w.buffers.values()))


def test_plan_train_is_what_a_step_allocates(checkpoints, runs, monkeypatch, capsys):
    """`shardwise plan --train` prints, per rank and role, the bytes a Trainer holds after a step; the plan behind it
    (``training_memory``) equals them to the byte. Gathers through gloo, whose work buffers and staging the plan
    gives (through shared memory the DP ranks share them)."""
    import re

    import torch

    from shardwise import Layout, load_spec, plan_rank
    from shardwise.cli import main
    from shardwise.train.weights import training_memory

    monkeypatch.setenv("SHARDWISE_SHM", "0")
    path = str(checkpoints["llama-tied"])  # a tied head: one tensor, counted once
    measured = runs.result(("memory",))[0]  # measured with SHARDWISE_SHM=0 in the ranks
    for (tp, dp, provider, work, prefetch, offload), per_rank in zip(MEMORY, measured):
        argv = ["plan", path, "--tp", str(tp), "--dp", str(dp), "--provider", provider, "--prefetch", str(prefetch),
                "--train", *(["--work-dtype", work] if work else []), *(["--offload"] if offload else [])]
        main(argv)
        lines = capsys.readouterr().out.splitlines()
        columns = lines[1].split("q/kv heads")[1].split()
        for rank, got in enumerate(per_rank):
            what = f"{' '.join(argv[2:])}, rank {rank}"
            assert min(got.values()) > 0 or provider == "resident", f"{what}: {got}"
            plan = plan_rank(load_spec(path), Layout(tp=tp, dp=dp), rank, provider)
            assert training_memory(plan, work and getattr(torch, work), prefetch, offload) == got, what
            printed = dict(zip(columns, re.findall(r"([\d.]+) MB", lines[2 + rank])))
            shown = {role: f"{got[role] / 1e6:.2f}" for role in ("gradients", "moments", "work", "staging")}
            assert {role: printed[role] for role in shown} == shown, what
            assert printed["total"] == f"{sum(got.values()) / 1e6:.2f}", what
