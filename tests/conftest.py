"""Tiny real checkpoints, written by HF transformers itself, and HF's reference outputs for them."""

from __future__ import annotations

import fcntl
import os
import pickle
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def _ranks_skip_pytests_main() -> None:
    """A spawned rank first re-runs its parent's main module (multiprocessing does, for functions defined there).
    Launched from a test, that is pytest's, which only imports pytest, for nothing: ~0.2 s of CPU in each of the
    few hundred ranks a session starts. Ranks import what their functions need by name, as always."""
    import multiprocessing.spawn as spawn

    prepare = spawn.get_preparation_data

    def without_pytest(name: str) -> dict:
        data = prepare(name)
        if (data.get("init_main_from_name") == "pytest.__main__"
                or Path(data.get("init_main_from_path", "")).name in ("pytest", "py.test")):
            data.pop("init_main_from_name", None)
            data.pop("init_main_from_path", None)
        return data

    spawn.get_preparation_data = without_pytest


_ranks_skip_pytests_main()

# The suite starts a few hundred ranks: they fork from a server that imported torch once (shardwise.launch's
# forkserver start) instead of each starting a Python of its own. Tests of the default, spawn, set it themselves.
os.environ.setdefault("SHARDWISE_START_METHOD", "forkserver")

# ``make test``'s two workers each take a whole file at a time; started longest first, neither is left running a
# long one at the end while the other idles. The order of the slowest files, as measured; the others follow.
LONGEST_FIRST = ("test_zero3", "test_moe", "test_readme", "test_train", "test_cli", "test_bad_input", "test_train_cli",
                 "test_parity", "test_signals", "test_trust", "test_tp_plan", "test_gguf", "test_bench_zero3",
                 "test_fuzz_checkpoint", "test_series", "test_export", "test_quant_quality", "test_prompt_table",
                 "test_weight_only", "test_batch")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files in ``LONGEST_FIRST`` order (the Makefile turns off xdist's own, which counts tests, not seconds)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))


VOCAB = 131  # prime: no TP degree divides it

# One config per architecture, each with heads that TP=2..4 cannot split evenly.
ARCHS = {
    "llama": dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=16)),
    "mistral": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, sliding_window=7),
    "qwen2": dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3),
    "qwen3": dict(hidden_size=48, num_attention_heads=8, num_key_value_heads=4, head_dim=16),
    # 6 heads over 2 KV heads: replicated at tp 3 and 4; longrope whose original length 16 the 11-token prompt keeps
    # within (short factors) and generation outgrows (long factors: the KV cache is rerun as HF's generate reruns it);
    # 12 of 16 dims rotated, a 7-token window.
    "phi3": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, sliding_window=7,
                 original_max_position_embeddings=16, partial_rotary_factor=0.75, bos_token_id=1, eos_token_id=2,
                 pad_token_id=None, rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                         short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                                         long_factor=[1.5, 2.0, 3.0, 4.5, 6.0, 8.0])),
    # 6 heads over 3 KV heads, 12 wide (q 72 wide, hidden 64): uneven at tp 2, KV head 0 on two ranks at tp 4.
    "olmo2": dict(hidden_size=64, num_attention_heads=6, num_key_value_heads=3, head_dim=12, attention_bias=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None),
}
CHECKPOINTS = [f"{arch}-{tie}" for arch in ARCHS for tie in ("tied", "untied")]
PROMPT = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
STEPS = 16


def hf_config(arch: str, tied: bool, layers: int = 3):
    import transformers

    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
               "phi3": "Phi3Config", "olmo2": "Olmo2Config"}
    return getattr(transformers, classes[arch])(
        vocab_size=VOCAB, intermediate_size=100, num_hidden_layers=layers, max_position_embeddings=64,
        tie_word_embeddings=tied, initializer_range=0.1, **ARCHS[arch],
    )


def write_checkpoint(name: str, directory: Path, layers: int = 3) -> Path:
    """Save a random model with HF itself: tied ones in bf16 as one file, untied in fp32 split over several."""
    import transformers

    arch, tie = name.split("-")
    tied = tie == "tied"
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # hash() is salted per process: runs would differ
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, tied, layers))
    randomize_norms_and_biases(model)
    path = directory / name
    if tied:
        model.to(torch.bfloat16).save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size="40KB")
    return path


def randomize_norms_and_biases(model) -> None:
    """HF starts norm gains at one and biases at zero, where a gain or bias read from the wrong place (another
    head's, another rank's) changes nothing: random ones make every misplacement show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)


def hf_reference(path: Path, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's fp32 logits, and its greedy tokens recomputed from scratch at each step (no cache to trust)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
        seq = ids
        for _ in range(steps):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return logits, seq


T = TypeVar("T")


def once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], T]) -> T:
    """``make(directory)``, run once per test session however many pytest-xdist workers share it (``make test``
    runs two): the first worker to ask makes it under a lock and leaves the result beside the workers' own
    directories; the others wait and read it. So each checkpoint is written, and each HF reference computed, once."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent  # the session's: each worker's own directory is inside it
    made = root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not made.exists():
            (root / name).mkdir(exist_ok=True)  # a worker whose try raised (a skip, say) may have left it
            value = make(root / name)
            partial = made.with_suffix(".partial")
            partial.write_bytes(pickle.dumps(value))
            partial.rename(made)  # a worker that finds the file finds it whole
            return value
    return pickle.loads(made.read_bytes())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return once(tmp_path_factory, "ckpts", lambda root: {name: write_checkpoint(name, root) for name in CHECKPOINTS})


# Mixtures of experts: 6 experts, so that EP 4 shares them out unevenly (2, 2, 1, 1); Qwen2-MoE with its shared
# expert, Qwen3-MoE with a dense layer among the sparse ones and renormalized top-3 weights, Mixtral with top-2.
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=6, num_experts_per_tok=2, hidden_size=64,
                                      num_attention_heads=8, num_key_value_heads=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40, hidden_size=72, num_attention_heads=9,
                                         num_key_value_heads=3, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
                                         mlp_only_layers=[1], norm_topk_prob=True, hidden_size=48,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=16)),
}
MOE = [f"{family}-{tie}" for family in FAMILIES for tie in ("tied", "untied")]
BALANCED = [f"{family}-balanced" for family in FAMILIES]
"""Untied, with HF's balancing loss in training (``output_router_logits``), weighted 0.05 so that it counts."""


def write_moe_checkpoint(name: str, directory: Path) -> Path:
    """A random mixture of experts saved by HF: tied ones in bf16, untied (and balanced) in fp32 over several
    files."""
    import transformers

    family, tie = name.split("-")
    cls, sizes = FAMILIES[family]
    balanced = dict(output_router_logits=True, router_aux_loss_coef=0.05) if tie == "balanced" else {}
    config = getattr(transformers, cls)(vocab_size=VOCAB, intermediate_size=100, num_hidden_layers=3,
                                       max_position_embeddings=64, tie_word_embeddings=tie == "tied",
                                       initializer_range=0.1, **sizes, **balanced)
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_norms_and_biases(model)
    path = directory / name
    if tie == "tied":
        model.to(torch.bfloat16).save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size="40KB")
    return path


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory) -> dict[str, Path]:
    return once(tmp_path_factory, "moe",
                lambda root: {name: write_moe_checkpoint(name, root) for name in MOE + BALANCED})


@pytest.fixture(scope="session")
def references(checkpoints, tmp_path_factory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return once(tmp_path_factory, "references",
                lambda _: {name: hf_reference(path, PROMPT, STEPS) for name, path in checkpoints.items()})


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    """The SmolLM2 GGUF and its fp32 import, once per session (135M parameters to dequantize and write)."""
    from test_gguf import smollm2_gguf

    from shardwise.io.gguf.importer import import_gguf

    src = smollm2_gguf()
    return src, once(tmp_path_factory, "smol", lambda root: import_gguf(src, root / "hf", dtype="float32"))


@pytest.fixture(scope="session")
def smollm2_demo(tmp_path_factory) -> Path:
    """SmolLM2 imported as `make demo` imports it (the import's default dtype), which the README's commands use."""
    from test_gguf import smollm2_gguf

    from shardwise.io.gguf.importer import import_gguf

    src = smollm2_gguf()
    return once(tmp_path_factory, "smol-demo", lambda root: import_gguf(src, root / "smollm2-135m-instruct"))
