"""The `shardwise` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

from . import __version__
from .bench import bench_export_rank, bench_generate_rank, bench_load_rank, bench_zero3_rank, warm_page_cache
from .bench_series import PATTERNS, bench_series_rank
from .generate import GenerateArgs, generate_rank
from .launch import LaunchInterrupted, RankError, in_torchrun, launch
from .layout import PROVIDERS, Layout, plan_rank
from .loader import Provide, check_provider_options
from .publish import check_target
from .reader import MANIFEST
from .series import Series, SeriesError
from .spec import DTYPES, load_spec
from .windows import series_memory
from .words import plural
from .zero3 import memory_plan

log = logging.getLogger("shardwise")


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


QUANTIZED = {"float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn, "int8": torch.int8}


def _dtype_or_quantized(name: str) -> torch.dtype:
    if name in QUANTIZED:
        return QUANTIZED[name]
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r} (choose from {', '.join([*DTYPES, *QUANTIZED])})")
    return DTYPES[name]


def _bounded(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a number of ``kind`` in [low, high] (or (low, high] with ``low_open``), said in one line."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' finite number'}")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
            raise argparse.ArgumentTypeError(f"{text} must be {bounds}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE = _bounded(int, 1)
SEED = _bounded(int, 0, 2**63 - 1)


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=POSITIVE, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=POSITIVE, default=1, help="pipeline-parallel degree (stages)")
    p.add_argument("--dp", type=POSITIVE, default=1, help="data-parallel degree (replicas, or ZeRO-3 shards)")


def _series(text: str) -> Series:
    try:
        return Series.parse(text)
    except SeriesError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _series_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--series", type=_series, action="append", default=[], metavar="PATTERN[,k=K][,layers=LO:HI]",
                   help="series: one tensor per layer (e.g. '*.o', '*.down'), each layer stored by one DP rank and "
                        "broadcast k layers ahead (k default 1); repeat for several series")


def _provider_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", choices=PROVIDERS, default="resident",
                   help="resident: every rank keeps its weights; zero3: 1/dp each, gathered block by block; "
                        "series: resident, except the --series layers, each stored by one DP rank")
    _series_arg(p)
    p.add_argument("--work-dtype", type=_dtype_or_quantized, default=None,
                   help="zero3: dtype gathered and computed in (float8_e4m3fn, int8: quantized gathers computed "
                        "in --dtype); default --dtype")
    p.add_argument("--prefetch", type=_bounded(int, 0), default=1, help="zero3: blocks gathered ahead")
    p.add_argument("--offload", action="store_true", help="zero3: keep the master shards in host memory (in "
                   "training, AdamW's moments and the gradient sums too)")


def _layout(args) -> Layout:
    return Layout(args.tp, args.pp, args.dp)


def _provide(args) -> Provide:
    """The provider options, checked before any rank is spawned."""
    check_provider_options(args.provider, args.dtype, args.work_dtype, args.prefetch, args.offload, flags=True)
    return Provide(args.provider, args.work_dtype, args.prefetch, args.offload, tuple(args.series))


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at the destination (never anything else)")


def _written_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", type=_dtype, help="dtype of the written tensors (default: each as SRC holds it; a "
                   "training checkpoint's fp32 masters in the dtype of the model it was trained from); config.json "
                   "names the dtype the files hold")


def _world(args) -> int:
    world = _layout(args).world_size
    if in_torchrun() and int(os.environ["WORLD_SIZE"]) != world:
        sys.exit(f"--tp {args.tp} x --pp {args.pp} x --dp {args.dp} = {plural(world, 'rank')}, but torchrun "
                 f"started {os.environ['WORLD_SIZE']}")
    return world


def _is_rank0() -> bool:
    """Whether this process reports results: always when spawning ranks, only rank 0 under torchrun."""
    return not in_torchrun() or int(os.environ.get("RANK", "0")) == 0


def _checkpoint_dir(path: str, flag: str = "") -> str:
    """``path``, refused in one line if it is a file (a weight file, a config.json): commands read a directory."""
    if Path(path).is_file():
        raise ValueError(f"{flag + ' ' if flag else ''}{path}: is a file; give the checkpoint directory, not a file")
    return path


def _plan_everywhere(path: str, layout: Layout, provider: str = "resident", series: tuple[Series, ...] = (),
                     config_file: bool = False):
    """The model spec of the checkpoint directory ``path`` (or with ``config_file``, of a config.json too), with the
    layout (and any series) checked on every rank: what a spawned job would find, in a second."""
    spec = load_spec(path if config_file else _checkpoint_dir(path))
    for rank in range(layout.world_size):
        plan_rank(spec, layout, rank, provider, series)
    return spec


def _check_generate(args, prompts: tuple[str, ...], labels: tuple[str, ...]) -> None:
    """Every mistake a generate job could make, found before any rank is spawned."""
    from .text import Text

    spec = _plan_everywhere(args.checkpoint, _layout(args), args.provider, tuple(args.series))
    _check_device(args.device, _layout(args).world_size)
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        log.warning("--top-k/--top-p have no effect without --temperature > 0 (greedy decoding)")
    ids = _prompt_ids(Text(args.checkpoint), prompts, args.chat, spec.vocab, labels)
    longest = max(len(i) for i in ids)
    _check_cache_fits(spec, _layout(args), len(ids), longest + args.max_new_tokens, args.dtype.itemsize)
    limit = spec.config.get("max_position_embeddings")
    if isinstance(limit, int) and longest + args.max_new_tokens > limit:
        log.warning("%d prompt + %d new tokens run past the model's %d positions; expect degraded text",
                    longest, args.max_new_tokens, limit)


def _check_device(device: str, world: int) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # under torchrun, only this node's ranks need GPUs here
    if kind == "cuda" and torch.cuda.device_count() < local:
        raise ValueError(f"--device {device} needs {plural(local, 'GPU')}, this machine has "
                         f"{torch.cuda.device_count()}")


def _prompt_ids(text, prompts: tuple[str, ...], chat: bool, vocab: int, labels: tuple[str, ...]) -> list[list[int]]:
    """Each prompt's ids, refusing one that comes out empty or names tokens the model has no embedding for (named
    by its label, as its answer would be)."""
    out = []
    for n, prompt in zip(labels, prompts, strict=True):
        ids = text.prompt_ids(prompt, chat)
        if not ids:
            raise ValueError(f"prompt {n} ({prompt!r}) has no tokens; give the text to continue")
        if max(ids) >= vocab:
            raise ValueError(f"prompt {n} has token id {max(ids)}, but the model's vocabulary has {vocab} "
                             "(tokenizer and model disagree)")
        out.append(ids)
    return out


def _check_cache_fits(spec, layout: Layout, batch: int, positions: int, itemsize: int) -> None:
    """Refuse a KV cache larger than this machine's memory: it would fail deep inside a rank, or swap it to death."""
    kv_heads = -(-spec.kv_heads // layout.tp)
    per_rank = 2 * -(-spec.layers // layout.pp) * batch * kv_heads * positions * spec.head_dim * itemsize
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if per_rank * layout.world_size > memory:
        raise ValueError(f"a KV cache of {positions} positions for {plural(batch, 'prompt')} needs about "
                         f"{per_rank * layout.world_size / 2**30:.0f} GiB, more than this machine's "
                         f"{memory / 2**30:.0f} GiB; lower --max-new-tokens")


def _prompts(args) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every --prompt, then every non-blank line of --prompts FILE; and the labels of their answers, which print as
    they complete: the --prompt texts numbered in order, the file's by their line (blank lines counted), as
    FILE:LINE when both are given."""
    prompts = list(args.prompt or [])
    labels = [str(n) for n in range(1, len(prompts) + 1)]
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{args.prompts_file}: cannot read the prompts ({e})") from None
        where = f"{args.prompts_file}:" if prompts else ""
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        prompts += [line for _, line in numbered]
        labels += [f"{where}{n}" for n, _ in numbered]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    return tuple(prompts), tuple(labels)


def cmd_generate(args) -> None:
    prompts, labels = _prompts(args)
    provide = _provide(args)
    _check_generate(args, prompts, labels)
    job = GenerateArgs(args.checkpoint, _layout(args), prompts, args.max_new_tokens, args.dtype, args.device,
                       args.chat, args.temperature, args.top_k, args.top_p, args.seed, provide=provide, labels=labels)
    result = launch(generate_rank, _world(args), job)
    if _is_rank0():
        rss = " ".join(f"r{r}={b / 2**20:.0f}MiB" for r, b in enumerate(result["rss"]))
        print(f"[shardwise] {_layout(args)} {args.provider} load {result['load_s']:.2f}s, "
              f"{plural(result['new_tokens'], 'token')} at {result['tokens_per_s']:.1f} tok/s, rss {rss}",
              file=sys.stderr)


KINDS = {
    "embed": "embedding", "lm_head": "lm_head", "norm": "norms", "attn_norm": "norms", "mlp_norm": "norms",
    "q_norm": "norms", "k_norm": "norms", "qkv": "attention", "qkv_bias": "attention", "o": "attention",
    "o_bias": "attention", "gate_up": "mlp", "gate_up_bias": "mlp", "down": "mlp", "down_bias": "mlp",
}


def plan_table(path: str, layout: Layout, dtype: torch.dtype | None, provide: Provide | None = None,
               train: bool = False) -> str:
    """Bytes each rank will hold, by tensor kind (its masters, under ZeRO-3), plus ZeRO-3's buffers or a series'
    windows, as a table; under a series, what each series saves. With ``train``, what ``shardwise train`` holds:
    fp32 masters, their gradient sums, AdamW's moments, and a step's work buffers and staging."""
    from .train import TRAINABLE, training_memory

    spec = load_spec(path)
    dtype = dtype or (torch.float32 if train else spec.dtype)
    provide = provide or Provide()
    if train and (provide.provider not in TRAINABLE or layout.pp > 1 or dtype != torch.float32):
        raise ValueError(f"--train plans what shardwise train holds: --provider {' or '.join(TRAINABLE)}, --pp 1 and "
                         f"float32 masters, not --provider {provide.provider} --pp {layout.pp} --dtype "
                         f"{str(dtype).removeprefix('torch.')}")
    zero3, series = provide.provider == "zero3", provide.provider == "series"
    columns = ["embedding", "attention", "mlp", "norms", "lm_head"]
    columns += ["gradients", "moments", "work", "staging"] if train else ["work", "staging"] if zero3 else \
        ["windows"] if series else []
    how = provide.provider
    if zero3:
        work = str(provide.work_dtype or dtype).removeprefix("torch.")
        how += f" (work {work}, prefetch {provide.prefetch}{', offload' if provide.offload else ''})"
    how += ", training" if train else ""
    lines = [f"{spec.arch}: {plural(spec.layers, 'layer')}, {plural(spec.heads, 'head')} / "
             f"{plural(spec.kv_heads, 'KV head')}, vocab {spec.vocab}, {layout}, {str(dtype).removeprefix('torch.')}, "
             f"{how}",
             f"{'rank':>4} {'stage':>5} {'dp':>3} {'tp':>3} {'layers':>9} {'q/kv heads':>10} "
             + " ".join(f"{c:>11}" for c in columns) + f" {'total':>11}"]
    saved: dict[str, list[str]] = defaultdict(list)  # series -> one line per rank
    for rank in range(layout.world_size):
        plan = plan_rank(spec, layout, rank, provide.provider, provide.series)
        kinds: dict[str, int] = defaultdict(int)
        for buffer in plan.buffers:
            placed: dict[tuple, str] = {}  # an alias (a tied LM head) is its embedding's bytes: counted once
            for v in buffer.views:
                placed.setdefault((v.offset, v.shape), v.name.split("@")[0])
            for (_, shape), name in placed.items():
                kinds[KINDS[name.split(".")[-1]]] += math.prod(shape) * dtype.itemsize
        total = plan.nbytes(dtype)
        if train:
            memory = training_memory(plan, provide.work_dtype, provide.prefetch, provide.offload)
            kinds |= {role: memory[role] for role in ("gradients", "moments", "work", "staging")}
            total = sum(memory.values())
        elif zero3:
            memory = memory_plan(plan, dtype, provide.work_dtype, provide.prefetch, provide.offload)
            kinds["work"], kinds["staging"] = memory["work"], memory["staging"]
            total = sum(memory.values())
        for name, m in series_memory(plan, dtype).items():
            kinds["windows"] += m["windows"]
            total += m["windows"]
            saved[name].append(f"rank {rank}: stores {_mb(m['held'])} of {_mb(m['unsharded'])}, windows "
                               f"{_mb(m['windows'])}, saves {_mb(m['unsharded'] - m['held'] - m['windows'])}")
        layers = f"{plan.layers.start}-{plan.layers.stop - 1}"
        heads = f"{plan.heads.n_q}/{plan.heads.n_kv}"
        lines.append(f"{rank:>4} {plan.stage:>5} {plan.dp_rank:>3} {plan.tp_rank:>3} {layers:>9} {heads:>10} "
                     + " ".join(f"{_mb(kinds[c]):>11}" for c in columns) + f" {_mb(total):>11}")
    if train:
        lines.append("training: fp32 masters by kind, their gradient sums and AdamW's two moments; work and staging as "
                     "a step allocates them (zero3: gathered blocks; cast chunks, the per-block DP gradient buffers, "
                     "offload's fetch and optimizer buffers); activations not counted")
    if train and provide.offload:
        lines.append("--offload: masters, gradients and moments are in host memory; the device holds work and staging")
    if zero3 and layout.dp > 1:
        lines.append("work and staging as for gloo gathers; DP ranks on one host share the work buffers in shared "
                     "memory and cast in place, with no staging")
    lines += [f"series {name} {line}" for name, held in saved.items() for line in held]
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def cmd_plan(args) -> None:
    print(plan_table(args.path, _layout(args), args.dtype, _provide(args), args.train))


def _report(message: str) -> None:
    if _is_rank0():
        print(message)


def cmd_bench_load(args) -> None:
    provide = _provide(args)
    _plan_everywhere(args.checkpoint, _layout(args), args.provider, provide.series)
    warm_page_cache(args.checkpoint)
    rows = launch(bench_load_rank, _world(args), args.checkpoint, _layout(args), args.dtype, args.hf, provide)
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            hf = f", HF {row['hf_load_s']:.3f}s" if "hf_load_s" in row else ""
            print(f"rank {row['rank']}: load {row['load_s']:.3f}s (floor {row['floor_s']:.3f}s{hf}), "
                  f"{row['shard_bytes'] / 1e6:.1f} MB, peak RSS growth x{row['rss_ratio']:.2f}")


def cmd_bench_generate(args) -> None:
    from .text import Text

    provide = _provide(args)
    spec = _plan_everywhere(args.checkpoint, _layout(args), args.provider, provide.series)
    _prompt_ids(Text(args.checkpoint), (args.prompt,), False, spec.vocab, ("1",))
    row = launch(bench_generate_rank, _world(args), args.checkpoint, _layout(args), args.prompt,
                 args.max_new_tokens, not args.no_hf, provide)
    if args.json:
        print(json.dumps(row))
        return
    hf = f"{row['hf_tok_s']:.2f} tok/s" if "hf_tok_s" in row else row.get("hf_error", "not run")
    print(f"{_layout(args)} {args.provider}: shardwise {row['shardwise_tok_s']:.2f} tok/s, HF tp_plan {hf}")


def _check_train(args):
    """Every mistake a train job could make, found before any rank is spawned; the token stream it trains on, and
    with --resume the saved record."""
    from .data import TokenStream, check_batching, thin_text, tokenize_file
    from .train import TRAINABLE
    from .train_run import check_log, same_directory
    from .train_state import Record, base_dtype

    if args.pp > 1:
        raise ValueError(f"--pp {args.pp}: training over pipeline stages is not built yet; use --pp 1")
    if args.provider not in TRAINABLE:
        raise ValueError(f"--provider {args.provider}: training runs on {' or '.join(TRAINABLE)}")
    if args.series:
        raise ValueError("--series declares layers of --provider series, which training does not run on")
    _provide(args)
    spec = _plan_everywhere(args.checkpoint, _layout(args), args.provider)
    if args.resume:
        _checkpoint_dir(args.resume, "--resume")
    in_place = same_directory(args.resume, args.save)  # each save replaces RUN, vetted below as this run's
    others = [args.resume] if args.resume and not in_place else []
    check_target(args.save, args.overwrite or in_place, [args.checkpoint, *others])
    if args.log:
        check_log(args.log, args.checkpoint)
    check_batching(args.batch, args.dp, args.accumulate)
    ids = tokenize_file(args.checkpoint, args.data)
    stream = TokenStream.from_ids(ids, args.seq, args.batch, args.seed, args.data)
    for warning in thin_text(args.data, len(ids), args.seq, args.batch):
        log.warning("%s", warning)
    if int(stream.windows.max()) >= spec.vocab:
        raise ValueError(f"{args.data}: token id {int(stream.windows.max())}, but the model's vocabulary has "
                         f"{spec.vocab} (tokenizer and model disagree)")
    if args.resume:
        shapes = {name: info.shape for name, info in spec.tensors().items()}
        saved = {name: info.shape for name, info in load_spec(args.resume).tensors().items()}
        if saved != shapes:
            raise ValueError(f"--resume {args.resume}: its config.json describes another model than "
                             f"{args.checkpoint}'s ({len(saved)} tensors against {len(shapes)}, or other shapes)")
        record = Record.read(args.resume)
        record.check_resumable(args.resume, stream, args.steps)
        return stream, record
    base_dtype(args.checkpoint)  # the dtype the saves record (a training checkpoint's, from its record: vetted)
    return stream, None


def cmd_train(args) -> None:
    from .train_run import TrainArgs, settings, train_rank

    stream, record = _check_train(args)
    job = TrainArgs(args.checkpoint, _layout(args), _provide(args), stream, args.steps, args.lr, args.save,
                    args.warmup, args.schedule, args.weight_decay, args.clip or None, args.accumulate,
                    args.save_every, args.overwrite, args.log, args.resume)
    if record is not None and record.changed(settings(job)):
        log.warning("--resume %s: this run changes %s (steps %d on follow this run's settings, not the saved run's)",
                    args.resume, ", ".join(record.changed(settings(job))), record.step + 1)
    result = launch(train_rank, _world(args), job)
    _report(f"trained steps {result['first_step']}..{result['steps']} on {plural(len(stream.windows), 'window')} of "
            f"{args.seq} tokens ({_layout(args)}, {args.provider}): loss {result['first_loss']:.4f} -> "
            f"{result['last_loss']:.4f}; saved {args.save}")


def cmd_import_gguf(args) -> None:
    from .gguf_import import import_gguf

    out = import_gguf(args.gguf, args.out_dir, args.dtype, overwrite=args.overwrite)
    _report(f"wrote {out}")


def write_rank(src: str, out: str, layout: Layout, provide: Provide, sharded: bool, overwrite: bool,
               dtype: torch.dtype | None = None) -> None:
    """Load this rank's part of ``src`` and write it to ``out``: a sharded checkpoint, or HF safetensors; in
    ``dtype``, or each tensor in the dtype ``src`` holds it in."""
    from .hf_export import export
    from .loader import load_weights
    from .sharded import save_sharded

    weights = load_weights(src, layout, dtype, provider=provide.provider, series=provide.series)
    if dtype is not None:  # written as loaded, not cast back to the source's dtypes
        weights = dataclasses.replace(weights, source_dtypes=dict.fromkeys(weights.source_dtypes, dtype))
    (save_sharded if sharded else export)(weights, out, overwrite=overwrite)


def _written_dtype(args) -> torch.dtype | None:
    """--dtype; else for a training checkpoint, whose files hold fp32 masters, the dtype of the model it was trained
    from; else None: each tensor stays in SRC's dtype."""
    from .train_state import trained_from

    return args.dtype or trained_from(args.src)


def cmd_reshard(args) -> None:
    from .loader import open_source

    check_target(args.dst, args.overwrite, [args.src])  # before spawning: a refusal costs nothing
    if args.dp > 1 and args.provider == "resident":
        raise ValueError(f"--dp {args.dp} with resident weights would save {args.dp} identical copies; "
                         "use --provider zero3 to save each replica's 1/dp")
    series = tuple(args.series)
    spec = _plan_everywhere(args.src, _layout(args), args.provider, series)
    with open_source(args.src) as source:
        source.check(spec)
    launch(write_rank, _world(args), args.src, args.dst, _layout(args), Provide(args.provider, series=series), True,
           args.overwrite, _written_dtype(args))
    _report(f"wrote {args.dst} (sharded, {_layout(args)}, {args.provider})")


def init_rank(config: str, out: str, layout: Layout, seed: int, dtype: torch.dtype, sharded: bool,
              zero_residual: bool, overwrite: bool) -> None:
    from .hf_export import export
    from .init import init_weights
    from .sharded import save_sharded

    provider = "zero3" if layout.dp > 1 else "resident"  # replicas would draw the same boxes dp times
    path = Path(config)
    weights = init_weights(load_spec(path), layout, seed, provider=provider, dtype=dtype, zero_residual=zero_residual,
                           source_dir=path if path.is_dir() else path.parent)
    (save_sharded if sharded else export)(weights, out, overwrite=overwrite)


def cmd_init(args) -> None:
    check_target(args.out, args.overwrite, [])
    _plan_everywhere(args.config, _layout(args), config_file=True)
    launch(init_rank, _world(args), args.config, args.out, _layout(args), args.seed, args.dtype, args.sharded,
           args.zero_residual, args.overwrite)
    _report(f"wrote {args.out} ({'sharded' if args.sharded else 'HF safetensors'}, seed {args.seed}, "
            f"initialised by {plural(_world(args), 'rank')})")


def cmd_export(args) -> None:
    from .sharded import ShardedCheckpoint

    check_target(args.out, args.overwrite, [args.src])
    if not (Path(_checkpoint_dir(args.src)) / MANIFEST).is_file():
        raise ValueError(f"{args.src}: export takes a sharded checkpoint (one with {MANIFEST}); an HF checkpoint "
                         "needs no export: `shardwise reshard` makes a sharded one of it")
    source = ShardedCheckpoint(args.src)
    source.check(load_spec(args.src))  # the manifest's layout says how many ranks to spawn: vet it first
    layout = source.layout
    launch(write_rank, layout.world_size, args.src, args.out, layout, Provide(source.provider, series=source.series),
           False, args.overwrite, _written_dtype(args))
    _report(f"wrote {args.out} (HF safetensors, exported by {plural(layout.world_size, 'rank')})")


def cmd_bench_zero3(args) -> None:
    _plan_everywhere(args.checkpoint, Layout(dp=args.world), "zero3")
    warm_page_cache(args.checkpoint)
    rows = launch(bench_zero3_rank, args.world, args.checkpoint, args.tokens, args.repeats, args.prefetch, args.profile)
    _print_settings(rows, args.json, lambda row: f"{row['setting']:>13}: {row['s']:.3f} s per forward, peak RSS "
                    f"{row['peak_rss_mb']} MiB" if "s" in row else None)


def _print_settings(rows: list[dict], as_json: bool, describe) -> None:
    """A benchmark's rows: JSON lines, or ``describe(row)`` for each setting (None: skip) and the summary's scalars."""
    for row in rows:
        if as_json:
            print(json.dumps(row))
        elif row["setting"] == "summary":
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                           if not isinstance(v, dict)))
        elif (text := describe(row)) is not None:
            print(text)


def cmd_bench_train(args) -> None:
    from .bench_train import TRAIN_SETTINGS, bench_train_rank, train_summary

    _plan_everywhere(args.checkpoint, Layout(dp=args.world), "zero3")
    warm_page_cache(args.checkpoint)
    rows = [launch(bench_train_rank, args.world, args.checkpoint, args.seq, args.batch, args.steps, args.warmup,
                   1e-5, (setting,))[0] for setting in TRAIN_SETTINGS]  # fresh processes each: no inherited heap
    rows.append(train_summary(rows, args.world, args.batch, args.seq, args.steps))
    _print_settings(rows, args.json, lambda row: f"{row['setting']:>15}: {row['tokens_per_s']:.1f} tokens/s, "
                    f"{row['step_s']:.2f} s per step, peak RSS {row['peak_rss_mb']} MiB (training "
                    f"{row['train_peak_rss_mb']} MiB)")


def cmd_bench_series(args) -> None:
    patterns, ks = tuple(args.pattern or PATTERNS), tuple(args.k or (0, 1, 2))
    for k in ks:  # every declaration, checked on every rank before any is spawned
        series = tuple(Series(p, prefetch=k) for p in patterns)
        _plan_everywhere(args.checkpoint, Layout(dp=args.world), "series", series)
    warm_page_cache(args.checkpoint)
    row = launch(bench_series_rank, args.world, args.checkpoint, args.new_tokens, args.prompt_tokens, args.repeats,
                 args.dtype, patterns, ks, args.prefill_tokens)
    if args.json:
        print(json.dumps(row))
        return
    for key, value in row.items():
        for unit, shown in (("_s_per_token", "ms per decoded token"), ("_prefill_s", f"ms per {args.prefill_tokens}"
                                                                                   "-token forward")):
            if key.endswith(unit):
                name = key.removesuffix(unit)
                ratio = row.get(f"{name}_over_plain" if unit == "_s_per_token" else f"{name}_prefill_over_plain")
                print(f"{name:>10}: {value * 1e3:.1f} {shown}" + (f" ({ratio:.3f} x plain)" if ratio else ""))
    print(f"same tokens: {row['same_tokens']}; held MB per rank: "
          + ", ".join(f"{name} {max(b) / 1e6:.1f}" for name, b in row["held_bytes"].items()))


def cmd_bench_export(args) -> None:
    import tempfile

    _plan_everywhere(args.checkpoint, Layout(args.tp))
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        row = launch(bench_export_rank, _world(args), args.checkpoint, args.tp, work)
    print(json.dumps(row) if args.json else
          f"export {row['export_s']:.2f}s vs sequential write {row['sequential_write_s']:.2f}s "
          f"({row['bytes'] / 1e6:.0f} MB), save sharded {row['save_sharded_s']:.2f}s, reshard {row['reshard_s']:.2f}s")


class _Help(argparse.HelpFormatter):
    """Shows each option's default, except where there is none to show (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return action.help
        return f"{action.help or ''} (default: %(default)s)".strip()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # -v works before or after the subcommand
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log diagnostics; show whole tracebacks")
    fmt = _Help
    parser = argparse.ArgumentParser(prog="shardwise", description=__doc__, parents=[common], formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"shardwise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(group, name: str, help: str, func) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help, description=help, parents=[common], formatter_class=fmt)
        p.set_defaults(func=func)
        return p

    g = command(sub, "generate", "generate text on N ranks (spawns them, or joins a torchrun world)", cmd_generate)
    g.add_argument("checkpoint")
    _layout_args(g)
    g.add_argument("--prompt", action="append", help="a text to continue; repeat for a batch")
    g.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="a file of prompts, one per line")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens to generate at most")
    g.add_argument("--dtype", type=_dtype, default="float32", help="dtype the ranks compute in")
    g.add_argument("--device", default="cpu", help="cpu or cuda (each rank takes its LOCAL_RANK GPU)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--temperature", type=_bounded(float, 0.0), default=0.0, help="0 means greedy")
    g.add_argument("--top-k", type=POSITIVE, help="sample from the k most likely tokens (needs --temperature)")
    g.add_argument("--top-p", type=_bounded(float, 0.0, 1.0, low_open=True),
                   help="sample from the smallest set of tokens whose probability reaches p (needs --temperature)")
    g.add_argument("--seed", type=SEED, default=0, help="sampling seed, the same on every rank")
    _provider_args(g)

    t = command(sub, "train", "fine-tune a checkpoint on a text file, on N ranks, and save it sharded", cmd_train)
    t.add_argument("checkpoint")
    t.add_argument("--data", required=True, metavar="FILE", help="a text file, tokenized with the checkpoint's "
                   "tokenizer; paragraphs joined with its EOS")
    t.add_argument("--steps", type=POSITIVE, required=True, help="optimizer steps in all (with --resume, the saved "
                   "ones included)")
    t.add_argument("--resume", metavar="DIR", help="a training checkpoint that shardwise train saved (at any layout) "
                   "from CHECKPOINT: go on from its step, with its weights and AdamW state, on the same data")
    t.add_argument("--batch", type=POSITIVE, default=8, help="windows per step, over all DP ranks")
    t.add_argument("--seq", type=_bounded(int, 2), default=128, help="tokens per window")
    t.add_argument("--accumulate", type=POSITIVE, default=1, help="micro-batches per step on every DP rank")
    t.add_argument("--lr", type=_bounded(float, 0.0, low_open=True), default=1e-4, help="peak learning rate")
    t.add_argument("--warmup", type=_bounded(int, 0), default=0, help="steps of linear warmup")
    t.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="after warmup: constant, or cosine down to lr/10 at the last step")
    t.add_argument("--weight-decay", type=_bounded(float, 0.0), default=0.0, help="AdamW decoupled weight decay")
    t.add_argument("--clip", type=_bounded(float, 0.0), default=1.0, help="max global gradient norm; 0: no clipping")
    t.add_argument("--seed", type=SEED, default=0, help="the data order follows from it (and the step) alone")
    _layout_args(t)
    _provider_args(t)
    t.set_defaults(dtype=torch.float32)
    t.add_argument("--save", required=True, metavar="DIR", help="where the trained sharded checkpoint goes; may be "
                   "the --resume DIR itself, which each save then replaces with a later step")
    t.add_argument("--save-every", type=POSITIVE, metavar="M", help="also save every M steps")
    _overwrite_arg(t)
    t.add_argument("--log", metavar="FILE", help="JSON lines: a first naming the model, then one per step (step, "
                   "loss, lr, grad_norm, tokens_per_s). A fresh run replaces a training log of this model (or an "
                   "empty file), a resume appends to it; any other existing file is refused")

    i = command(sub, "import-gguf", "convert a llama.cpp GGUF file to an HF-format checkpoint", cmd_import_gguf)
    i.add_argument("gguf")
    i.add_argument("out_dir")
    i.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="dtype of the written tensors")
    _overwrite_arg(i)

    r = command(sub, "reshard", "HF or sharded checkpoint -> sharded checkpoint under a new layout", cmd_reshard)
    r.add_argument("src")
    r.add_argument("dst")
    _layout_args(r)
    r.add_argument("--provider", choices=PROVIDERS, default="resident",
                   help="zero3: each DP rank saves its 1/dp of every block; series: each series layer is saved by "
                        "its one owner; either loads under any layout")
    _series_arg(r)
    _written_dtype_arg(r)
    _overwrite_arg(r)

    n = command(sub, "init", "a freshly initialised checkpoint, the same for any layout, written by all ranks",
                cmd_init)
    n.add_argument("config", help="a config.json, or a directory holding one (its tokenizer files are carried)")
    n.add_argument("out")
    n.add_argument("--seed", type=SEED, required=True, help="every weight follows from it (and its name and index)")
    _layout_args(n)
    n.add_argument("--sharded", action="store_true", help="write a sharded checkpoint instead of HF safetensors")
    n.add_argument("--dtype", type=_dtype, default="float32", help="dtype of the written tensors")
    n.add_argument("--zero-residual", action="store_true", help="start o_proj and down_proj at zero")
    _overwrite_arg(n)

    e = command(sub, "export", "sharded checkpoint -> HF safetensors checkpoint, written by all its ranks", cmd_export)
    e.add_argument("src")
    e.add_argument("out")
    _written_dtype_arg(e)
    _overwrite_arg(e)
    e.set_defaults(tp=1, pp=1, dp=1)

    p = command(sub, "plan", "bytes each rank will hold, per tensor kind", cmd_plan)
    p.add_argument("path", help="checkpoint directory or config.json")
    _layout_args(p)
    p.add_argument("--dtype", type=_dtype, default="float32", help="dtype the ranks will hold, as generate's")
    _provider_args(p)
    p.add_argument("--train", action="store_true", help="add what shardwise train holds: gradient sums, AdamW "
                   "moments, a step's work buffers and staging (resident or zero3, float32)")

    b = command(sub, "bench", "benchmarks", None).add_subparsers(dest="bench", required=True)
    bl = command(b, "load", "per-rank load time, bytes and peak RSS, against a read floor and HF", cmd_bench_load)
    bl.add_argument("checkpoint")
    _layout_args(bl)
    bl.add_argument("--dtype", type=_dtype, default="float32", help="dtype the ranks load into")
    _provider_args(bl)
    bl.add_argument("--hf", action="store_true", help="also time HF from_pretrained(tp_plan='auto') in the same run")
    bl.add_argument("--json", action="store_true", help="one JSON object per rank per line")
    bg = command(b, "generate", "greedy fp32 tokens/s of shardwise and HF tp_plan='auto', side by side",
                 cmd_bench_generate)
    bg.add_argument("checkpoint")
    _layout_args(bg)
    bg.add_argument("--prompt", default="What is the capital of France?", help="the text to continue")
    bg.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens to generate, exactly")
    bg.add_argument("--no-hf", action="store_true", help="skip the HF measurement (only run on TP-only layouts)")
    bg.add_argument("--json", action="store_true")
    bg.set_defaults(dtype=torch.float32)
    _provider_args(bg)
    bt = command(b, "train", "training tokens/s and peak RSS per rank: shardwise zero3 and resident, and torch FSDP2",
                 cmd_bench_train)
    bt.add_argument("checkpoint")
    bt.add_argument("--world", type=POSITIVE, default=2, help="ranks, all in one DP group")
    bt.add_argument("--seq", type=_bounded(int, 2), default=256, help="tokens per sequence")
    bt.add_argument("--batch", type=POSITIVE, default=1, help="sequences per rank per step")
    bt.add_argument("--steps", type=POSITIVE, default=3, help="timed steps per setting (median)")
    bt.add_argument("--warmup", type=_bounded(int, 0), default=1, help="untimed steps first")
    bt.add_argument("--json", action="store_true")
    bz = command(b, "zero3", "forward time and memory: DP replicas, ZeRO-3 (bf16, fp8, int8 gathers) and torch FSDP2",
                 cmd_bench_zero3)
    bz.add_argument("checkpoint")
    bz.add_argument("--world", type=POSITIVE, default=2, help="ranks, all in one DP group")
    bz.add_argument("--tokens", type=POSITIVE, default=128, help="tokens of the one-sequence batch")
    bz.add_argument("--repeats", type=POSITIVE, default=5, help="timed forwards per setting (median)")
    bz.add_argument("--prefetch", type=_bounded(int, 0), default=1, help="blocks gathered ahead")
    bz.add_argument("--profile", action="store_true", help="add a per-block profile and a raw gather probe")
    bz.add_argument("--json", action="store_true", help="one JSON object per setting, then a summary")
    bs = command(b, "series", "decode s/token of DP replicas with and without o/down in a layer-sharded series",
                 cmd_bench_series)
    bs.add_argument("checkpoint")
    bs.add_argument("--world", type=_bounded(int, 2), default=2, help="ranks, all in one DP group")
    bs.add_argument("--pattern", action="append", default=None,
                    help=f"a series pattern; repeat for several (default: {' '.join(PATTERNS)})")
    bs.add_argument("--k", type=_bounded(int, 0), action="append", default=None,
                    help="prefetch steps to measure; repeat (default: 0 1 2)")
    bs.add_argument("--new-tokens", type=_bounded(int, 2), default=32, help="tokens decoded per generation")
    bs.add_argument("--prompt-tokens", type=POSITIVE, default=32, help="length of the seeded random prompt")
    bs.add_argument("--prefill-tokens", type=_bounded(int, 0), default=128,
                    help="tokens of a separately timed forward (a prefill); 0 skips it")
    bs.add_argument("--repeats", type=POSITIVE, default=5, help="timed generations per setting (median)")
    bs.add_argument("--dtype", type=_dtype, default="bfloat16", help="dtype the ranks compute in")
    bs.add_argument("--json", action="store_true", help="one JSON object")
    be = command(b, "export", "parallel HF export vs one sequential write of the same bytes; reshard time",
                 cmd_bench_export)
    be.add_argument("checkpoint")
    be.add_argument("--tp", type=POSITIVE, default=1, help="tensor-parallel degree of the export (reshard: PP=TP)")
    be.set_defaults(pp=1, dp=1)
    be.add_argument("--work-dir", default=None, help="where to write (default: the system temp dir)")
    be.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        args.func(args)
    except LaunchInterrupted as e:  # Ctrl-C or SIGTERM: every rank is already stopped; exit as the signal would
        print(f"shardwise: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("shardwise: interrupted", file=sys.stderr)
        sys.exit(130)
    except RankError as e:  # one line naming the rank and the cause; -v keeps the whole traceback
        if args.verbose:
            raise
        if e.__cause__ is None:  # a rank that died (its message says how), or whose exception could not travel
            sys.exit(f"shardwise: {e}")
        sys.exit(f"shardwise: rank {e.rank}: {type(e.__cause__).__name__}: {e.__cause__}")
    except (ValueError, OSError) as e:
        if args.verbose:
            raise
        sys.exit(f"shardwise: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
