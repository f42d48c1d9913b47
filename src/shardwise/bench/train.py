"""``shardwise bench train``: training tokens/s and peak RSS per rank, against torch FSDP2, in one run.

The settings train the same model on the same data, one after another in the same
rank processes: HF's model under torch FSDP2 (``fully_shard`` per decoder layer, then the
root) with ``torch.optim.AdamW``, as is and with HF's activation checkpointing
(``fsdp2_recompute``: ZeRO-3 recomputes each block in its backward, so this is the
like-for-like memory peer), then shardwise ``zero3`` and ``resident`` (DDP-like) through
``Trainer`` and shardwise's AdamW. All keep fp32 parameters and compute in fp32, clip the
global gradient norm to 1 and take the same AdamW hyperparameters. ``shardwise bench
train`` launches each setting in fresh rank processes (a setting run after another
inherits heap the allocator has not returned: 0.7 GB per rank after FSDP2's, measured),
all with transformers imported, so every setting's RSS carries the same baseline.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..io.loader import load_model
from ..plan.mesh import Layout
from ..plan.spec import load_spec
from ..train.optim import AdamW
from ..train.step import Trainer, keep_freed_heap
from .measure import _MB, _release_freed_memory, _reset_peak, _status_kb, all_ranks, barrier

TRAIN_SETTINGS = ("fsdp2", "fsdp2_recompute", "zero3", "resident")
CLIP = 1.0


def bench_train_rank(checkpoint: str, seq: int = 256, batch: int = 1, steps: int = 3, warmup: int = 1,
                     lr: float = 1e-5, settings: tuple[str, ...] = TRAIN_SETTINGS) -> list[dict]:
    """One line per setting (on rank 0); runs on every rank of one DP group.

    Each rank trains on its own seeded (batch, seq) ids, the same for every setting. A
    setting's step time is the largest of the ranks' median over ``steps`` timed steps
    (each after a barrier, following ``warmup`` untimed ones); tokens/s counts every
    rank's tokens. ``losses`` (every step's global mean) show that the settings train
    alike. ``peak_rss_mb`` is each rank's high-water mark over the whole setting (loading
    included), ``train_peak_rss_mb`` over the timed steps alone. The command runs each
    setting in processes of its own, so no setting inherits another's heap.
    """
    import transformers  # noqa: F401 - the same import baseline under every setting

    if seq < 2 or batch < 1 or steps < 1 or warmup < 0 or not set(settings) <= set(TRAIN_SETTINGS):
        raise ValueError(f"seq {seq} must be >= 2, batch {batch} and steps {steps} >= 1, warmup {warmup} >= 0, "
                         f"settings {settings} among {TRAIN_SETTINGS}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    vocab = load_spec(checkpoint).vocab
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1000 + rank))
    return [_setting(setting, lambda setting=setting: _make_step(checkpoint, setting, world, lr), ids,
                     world * ids.numel(), steps, warmup) for setting in settings]


def _make_step(checkpoint: str, setting: str, world: int, lr: float):
    if setting.startswith("fsdp2"):
        return _fsdp2_step(checkpoint, world, lr, recompute=setting == "fsdp2_recompute")
    return _shardwise_step(checkpoint, setting, Layout(dp=world), lr)


def bench_sp_rank(checkpoint: str, tp: int, sp: bool, seq: int, batch: int, steps: int, warmup: int,
                  lr: float = 1e-5) -> dict:
    """Resident training at TP ``tp`` with or without sequence parallelism, on (batch, seq) seeded ids the TP ranks
    share: the line of ``_setting`` (tokens/s counts the batch once)."""
    vocab = load_spec(checkpoint).vocab
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1000))
    name = f"tp {tp}{' sp' if sp else ''}, seq {seq}"
    line = _setting(name, lambda: _shardwise_step(checkpoint, "resident", Layout(tp=tp, sp=sp), lr), ids,
                    ids.numel(), steps, warmup)
    with load_model(checkpoint, Layout(tp=tp, sp=sp), dtype=torch.float32, progress=False) as model:
        saved = _saved_per_token(model, ids)
    return line | {"tp": tp, "sp": sp, "seq": seq, "layer_saved_per_token_h": all_ranks(round(saved, 3))}


def _saved_per_token(model, ids: torch.Tensor) -> float:
    """What autograd keeps of one decoder layer's forward for its backward, per token, in fp32 elements of the hidden
    size on this rank (Megatron's accounting, measured): every saved tensor but the weights, each storage once."""
    from ..model.pipeline import Pass, run_block
    from ..plan.names import EMBED, Block

    weights = {t.untyped_storage().data_ptr() for t in model.provider.tensors.values()}
    for t in model.provider.tensors.values():
        t.requires_grad_()
    t = ids.shape[1]
    p = Pass(ids, *model.rope(torch.arange(t)), seq=model.token_counts(t))
    kept: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return x

    layer = Block.of_layer(model.plan.layers[0])
    with model.provider.stream([EMBED, layer]) as weights_of:
        h = run_block(model, EMBED, None, next(weights_of), p, None).detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            run_block(model, layer, h, next(weights_of), p, None)
    return sum(kept.values()) / 4 / t / ids.shape[0] / model.spec.hidden


def activation_summary(lines: list[dict]) -> dict:
    """Per TP setting, the activation memory: the largest rank's training peak RSS at the longest sequence less at
    the shortest; and sequence parallelism's against without, in memory and in tokens/s at the longest."""
    longest, shortest = max(line["seq"] for line in lines), min(line["seq"] for line in lines)
    out: dict = {"setting": "summary"}
    for sp in (False, True):
        at = {line["seq"]: line for line in lines if line["sp"] == sp}
        key = "sp" if sp else "no_sp"
        out[f"{key}_activation_mb"] = max(at[longest]["train_peak_rss_mb"]) - max(at[shortest]["train_peak_rss_mb"])
        out[f"{key}_tokens_per_s"] = at[longest]["tokens_per_s"]
        out[f"{key}_layer_saved_per_token_h"] = max(at[longest]["layer_saved_per_token_h"])
    out["sp_over_no_sp_activation"] = out["sp_activation_mb"] / out["no_sp_activation_mb"]
    out["sp_over_no_sp_tokens_per_s"] = out["sp_tokens_per_s"] / out["no_sp_tokens_per_s"]
    out["sp_over_no_sp_layer_saved"] = out["sp_layer_saved_per_token_h"] / out["no_sp_layer_saved_per_token_h"]
    return out


def train_summary(lines: list[dict], world: int, batch: int, seq: int, steps: int) -> dict:
    """The headline figures of every setting's line, and zero3's against both FSDP2 settings."""
    summary: dict = {"setting": "summary", "world": world, "batch": batch, "seq": seq, "steps": steps}
    for line in lines:
        summary[f"{line['setting']}_tokens_per_s"] = line["tokens_per_s"]
        summary[f"{line['setting']}_peak_rss_mb"] = max(line["peak_rss_mb"])
        summary[f"{line['setting']}_train_peak_rss_mb"] = max(line["train_peak_rss_mb"])
    for peer in ("fsdp2", "fsdp2_recompute"):
        summary[f"zero3_over_{peer}_tokens_per_s"] = summary["zero3_tokens_per_s"] / summary[f"{peer}_tokens_per_s"]
        summary[f"zero3_over_{peer}_peak_rss"] = summary["zero3_peak_rss_mb"] / summary[f"{peer}_peak_rss_mb"]
    return summary


def _setting(setting: str, make_step, ids: torch.Tensor, tokens: int, steps: int, warmup: int) -> dict:
    """One setting's line: ``make_step()`` builds its (step, close), timed on ``ids``, ``tokens`` a step. Every
    setting, the peers' too, keeps its freed heap as a ``Trainer`` does."""
    keep_freed_heap()
    _release_freed_memory()
    _reset_peak()
    step, close = make_step()
    losses = [step(ids) for _ in range(warmup)]
    load_peak = _status_kb("VmHWM") * 1024
    _release_freed_memory()
    _reset_peak()
    times = []
    for _ in range(steps):
        barrier()
        start = time.perf_counter()
        losses.append(step(ids))
        times.append(time.perf_counter() - start)
    train_peak = _status_kb("VmHWM") * 1024
    close()
    del step, close  # the last references to the model: freed before the next setting loads
    step_s = max(all_ranks(statistics.median(times)))
    line = {"setting": setting, "step_s": step_s, "tokens_per_s": tokens / step_s, "losses": losses,
            "peak_rss_mb": all_ranks(round(max(load_peak, train_peak) / _MB, 1)),
            "train_peak_rss_mb": all_ranks(round(train_peak / _MB, 1))}
    _release_freed_memory()
    return line


def _shardwise_step(checkpoint: str, provider: str, layout: Layout, lr: float):
    """A ``Trainer`` step under ``layout``: the loss is the mean over every DP rank's predicted tokens."""
    model = load_model(checkpoint, layout, dtype=torch.float32, provider=provider, progress=False)
    trainer = Trainer(model, AdamW(model.provider, lr=lr), max_grad_norm=CLIP)

    def step(ids: torch.Tensor) -> float:
        return trainer.step([ids], layout.dp * ids.shape[0] * (ids.shape[1] - 1)).loss

    def close() -> None:
        trainer.close()
        model.close()

    return step, close


def _fsdp2_step(checkpoint: str, world: int, lr: float, recompute: bool):
    """HF's model under FSDP2 with torch's AdamW: its loss is this rank's mean, and FSDP2 averages gradients over
    the ranks, which with equal batches is the same global mean (reported as the ranks' mean, as shardwise's is;
    that exchange of one float per step is timed too)."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)  # weight decay 0.01, as shardwise's AdamW

    def step(ids: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        return statistics.fmean(all_ranks(float(loss.detach())))

    return step, lambda: None


def bubble_theory(pp: int, micro_batches: int) -> float:
    """The share of a 1F1B step a stage idles, with every micro-batch's forward and backward equally long on every
    stage and free sends: (pp - 1) / (micro-batches + pp - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def bench_pipeline_rank(checkpoint: str, pp: int, seq: int, batch: int, micro_batches: int, steps: int,
                        warmup: int, lr: float = 1e-5) -> dict:
    """Resident training over ``pp`` stages (one rank each), ``micro_batches`` of ``batch`` sequences a step in
    1F1B order: tokens/s, and the bubble measured as each stage's time waiting for a neighbour (receiving, or its
    sends landing) over its step time, beside the 1F1B theory."""
    vocab = load_spec(checkpoint).vocab
    ids = torch.randint(0, vocab, (micro_batches, batch, seq), generator=torch.Generator().manual_seed(1000))
    model = load_model(checkpoint, Layout(pp=pp), dtype=torch.float32, progress=False)
    trainer = Trainer(model, AdamW(model.provider, lr=lr), max_grad_norm=CLIP)
    tokens = micro_batches * batch * (seq - 1)
    times, waits = [], []
    for i in range(warmup + steps):
        barrier()
        start, waited = time.perf_counter(), trainer.waited
        trainer.step(list(ids), tokens)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            waits.append(trainer.waited - waited)
    trainer.close()
    model.close()
    step_s = max(all_ranks(statistics.median(times)))
    bubbles = all_ranks(statistics.median(w / t for w, t in zip(waits, times)))
    return {"setting": f"pp {pp}", "pp": pp, "micro_batches": micro_batches, "step_s": step_s,
            "tokens_per_s": micro_batches * batch * seq / step_s, "bubble": statistics.fmean(bubbles),
            "bubble_per_stage": bubbles, "bubble_theory": bubble_theory(pp, micro_batches)}
