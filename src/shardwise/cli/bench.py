"""`shardwise bench ...`: each benchmark checked, launched on its ranks, and its rows printed."""

from __future__ import annotations

import json
from dataclasses import replace

from ..bench.export import bench_export_rank
from ..bench.generate import bench_generate_rank
from ..bench.load import bench_load_rank
from ..bench.measure import warm_page_cache
from ..bench.plan import bench_plan
from ..bench.reduce import bench_reduce_scatter_rank
from ..bench.series import PATTERNS, bench_series_rank
from ..bench.zero3 import bench_zero3_rank
from ..launch import launch
from ..plan.mesh import Layout
from ..plan.series import Series
from ..plan.spec import load_spec
from ..progress import stage
from .args import _layout, _plan_everywhere, _provide, _world
from .generate import _prompt_ids


def cmd_bench_load(args) -> None:
    provide = _provide(args)
    _plan_everywhere(args.checkpoint, _layout(args), args.provider, provide.series)
    warm_page_cache(args.checkpoint)
    rows = launch(bench_load_rank, _world(args), args.checkpoint, _layout(args), args.dtype, args.hf, provide,
                  args.cold)
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            hf = f", HF {row['hf_load_s']:.3f}s" if "hf_load_s" in row else ""
            read = f", read {row['read_bytes'] / 1e6:.1f} MB of {row['bytes'] / 1e6:.1f} MB planned" \
                if "read_bytes" in row else ""
            every = f" (every expert: {row['every_expert_bytes'] / 1e6:.1f} MB)" if "every_expert_bytes" in row else ""
            print(f"rank {row['rank']}: load {row['load_s']:.3f}s (floor {row['floor_s']:.3f}s{hf}), "
                  f"{row['shard_bytes'] / 1e6:.1f} MB, peak RSS growth x{row['rss_ratio']:.2f}{read}{every}")
    if args.cold:
        cold_summary(rows, args.json)


def cold_summary(rows: list[dict], as_json: bool) -> None:
    """The slower rank's cold load against a sequential cold read of the whole checkpoint, the mean of one before
    and one after the load (or why not cold)."""
    failed = next((row["cold"] for row in rows if row["cold"]), None)
    out = {"setting": "cold", "cold_load_s": max(row["load_s"] for row in rows),
           "sequential_read_s": rows[0]["sequential_read_s"], "sequential_reads_s": rows[0]["sequential_reads_s"]}
    out["cold_over_sequential"] = out["cold_load_s"] / out["sequential_read_s"]
    if failed:
        out["not_cold"] = failed
    if as_json:
        print(json.dumps(out))
    else:
        note = f" (NOT COLD: {failed})" if failed else ""
        before, after = out["sequential_reads_s"]
        print(f"cold_load_s={out['cold_load_s']:.3f} sequential_read_s={out['sequential_read_s']:.3f} (before the load "
              f"{before:.3f}, after {after:.3f}) x{out['cold_over_sequential']:.2f}{note}")


def cmd_bench_moe(args) -> None:
    """EP N, EP 1 and HF's model, one after the other in one run, on the same prompts."""
    from ..bench.moe import bench_moe_hf, bench_moe_rank, ceiling, exchange_time

    layout = _layout(args)
    spec = _plan_everywhere(args.checkpoint, layout, "resident", ())
    if not spec.experts:
        raise ValueError(f"{args.checkpoint}: {spec.arch} is not a mixture of experts")
    split, whole = f"ep{layout.ep}", "ep1"
    rows = {split: stage(f"bench moe: {split} timed", launch, bench_moe_rank, _world(args), args.checkpoint, layout,
                         args.dtype, args.max_new_tokens, args.batch),
            whole: stage(f"bench moe: {whole} timed", launch, bench_moe_rank, layout.tp, args.checkpoint,
                         replace(layout, ep=1, pp=1, dp=1), args.dtype, args.max_new_tokens, args.batch),
            "hf": stage("bench moe: HF's model timed", bench_moe_hf, args.checkpoint, args.dtype, args.max_new_tokens,
                        args.batch)}
    if layout.ep > 1:
        rows[split]["exchange_s"] = launch(exchange_time, layout.ep, args.checkpoint,
                                           replace(layout, ep=layout.ep, pp=1, dp=1, tp=1), args.dtype, args.batch)
    bound = ceiling(rows[split], rows[whole])
    if args.json:
        print(json.dumps(rows | {"ceiling": bound}))
        return
    for name, row in rows.items():
        decode = "too short to time" if row["decode_tok_s"] is None else f"{row['decode_tok_s']:.1f} tok/s"
        print(f"{name}: prefill {row['prefill_tok_s']:.0f} tok/s, decode {decode} "
              f"(batch {row['batch']}, {row['prompt_tokens']}-token prompts, {row['new_tokens']} new tokens)")
    if bound is None:
        return
    steps = {name: rows[name]["batch"] / rows[name]["decode_tok_s"] * 1e3 for name in (split, whole)}
    print("a decode step: " + ", ".join(f"{name} {steps[name]:.1f} ms, {rows[name]['experts_s'] * 1e3:.1f} of them "
                                        "computing experts" for name in (split, whole))
          + f" (slowest rank); one all-to-all of a step's rows {rows[split].get('exchange_s', 0) * 1e3:.2f} ms")
    print(f"with the rest of a step costing {split} what it costs {whole} (no exchange, no wait), {split} would "
          f"decode at x{bound:.2f} {whole}; it decodes at x{steps[whole] / steps[split]:.2f}")


def cmd_bench_decode(args) -> None:
    """bf16 and int8 weight-only under the layout, then HF's bf16 and torchao int8, one after the other."""
    from ..bench.decode import bench_decode_hf, bench_decode_rank

    layout = _layout(args)
    _plan_everywhere(args.checkpoint, layout, "resident", ())
    rows = [stage(f"bench decode: shardwise {weight_only or 'bf16'} timed", launch, bench_decode_rank, _world(args),
                  args.checkpoint, layout, weight_only, args.max_new_tokens) for weight_only in (None, "int8")]
    if not args.no_hf:
        rows += [row for int8 in (False, True) if (row := stage(
            f"bench decode: HF {'torchao int8' if int8 else 'bf16'} timed", bench_decode_hf, args.checkpoint, int8,
            args.max_new_tokens)) is not None]
    if args.json:
        print(json.dumps(rows))
        return
    base = rows[0]["decode_tok_s"]
    for row in rows:
        where = f"tp {row['tp']}" if row["setting"].startswith("shardwise") else "1 process"
        if row["decode_tok_s"] is None:
            print(f"{row['setting']} ({where}): decode too short to time")
            continue
        held = f", {row['bytes'] / 1e6:.0f} MB on rank 0" if "bytes" in row else ""
        ratio = f", x{row['decode_tok_s'] / base:.2f} shardwise bf16" if base else ""
        print(f"{row['setting']} ({where}): {row['ms_per_token']:.1f} ms/token, {row['decode_tok_s']:.1f} tok/s"
              f"{ratio}{held}")
    bf16, int8 = rows[0]["projections_s"], rows[1]["projections_s"]
    print(f"one token through every projection alone (slowest rank): bf16 {bf16 * 1e3:.1f} ms, int8 "
          f"{int8 * 1e3:.1f} ms: x{bf16 / int8:.2f}")


def cmd_bench_generate(args) -> None:
    from ..model.text import Text

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
    from ..bench.train import TRAIN_SETTINGS, bench_train_rank, train_summary

    if args.pp > 1:
        _bench_pipeline(args)
        return
    if args.sp:
        _bench_sequence_parallel(args)
        return
    _plan_everywhere(args.checkpoint, Layout(dp=args.world), "zero3")
    warm_page_cache(args.checkpoint)
    rows = [launch(bench_train_rank, args.world, args.checkpoint, args.seq, args.batch, args.steps, args.warmup,
                   1e-5, (setting,))[0] for setting in TRAIN_SETTINGS]  # fresh processes each: no inherited heap
    rows.append(train_summary(rows, args.world, args.batch, args.seq, args.steps))
    _print_settings(rows, args.json, lambda row: f"{row['setting']:>15}: {row['tokens_per_s']:.1f} tokens/s, "
                    f"{row['step_s']:.2f} s per step, peak RSS {row['peak_rss_mb']} MiB (training "
                    f"{row['train_peak_rss_mb']} MiB)")


SHORT_SEQ = 128  # the sequence whose peak, taken from the --seq one's, leaves the activation memory


def _bench_sequence_parallel(args) -> None:
    """TP --world without and with sequence parallelism, at seq 128 and --seq, each setting in fresh ranks."""
    from ..bench.train import activation_summary, bench_sp_rank

    if args.seq <= SHORT_SEQ:
        raise ValueError(f"--seq {args.seq}: give a sequence longer than {SHORT_SEQ}, the one it is compared with")
    _plan_everywhere(args.checkpoint, Layout(tp=args.world, sp=True))
    warm_page_cache(args.checkpoint)
    rows = [launch(bench_sp_rank, args.world, args.checkpoint, args.world, sp, seq, args.batch, args.steps,
                   args.warmup) for sp in (False, True) for seq in (SHORT_SEQ, args.seq)]
    rows.append(activation_summary(rows))
    _print_settings(rows, args.json, lambda row: f"{row['setting']:>18}: {row['tokens_per_s']:.1f} tokens/s, "
                    f"{row['step_s']:.2f} s per step, training peak RSS {row['train_peak_rss_mb']} MiB, a layer keeps "
                    f"{row['layer_saved_per_token_h']} x hidden fp32 values per token for its backward")


def _bench_pipeline(args) -> None:
    """One stage, then ``--pp`` stages, each in fresh ranks, on the same micro-batches."""
    from ..bench.train import bench_pipeline_rank

    _plan_everywhere(args.checkpoint, Layout(pp=args.pp))
    warm_page_cache(args.checkpoint)
    rows = [launch(bench_pipeline_rank, pp, args.checkpoint, pp, args.seq, args.batch, args.accumulate, args.steps,
                   args.warmup) for pp in (1, args.pp)]
    for row in rows[1:]:
        row["over_pp1_tokens_per_s"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    _print_settings(rows, args.json, lambda row: (
        f"{row['setting']:>5}: {row['tokens_per_s']:.1f} tokens/s, {row['step_s']:.2f} s per step of "
        f"{row['micro_batches']} micro-batches, bubble {row['bubble']:.3f} measured (per stage "
        f"{', '.join(f'{b:.3f}' for b in row['bubble_per_stage'])}), {row['bubble_theory']:.3f} in 1F1B theory"
        + (f"; x{row['over_pp1_tokens_per_s']:.2f} pp 1's tokens/s" if "over_pp1_tokens_per_s" in row else "")))


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
                print(f"{name:>12}: {value * 1e3:.1f} {shown}" + (f" ({ratio:.3f} x plain)" if ratio else ""))
    print(f"same tokens: {row['same_tokens']}; held MB per rank: "
          + ", ".join(f"{name} {max(b) / 1e6:.1f}" for name, b in row["held_bytes"].items()))


def cmd_bench_plan(args) -> None:
    layout = _layout(args)
    rank = layout.world_size - 1 if args.rank is None else args.rank
    if rank >= layout.world_size:
        raise ValueError(f"--rank {rank} is outside the {layout.world_size}-rank layout {layout}")
    spec = load_spec(args.path)
    for provider in args.provider or ("resident", "zero3"):
        row = bench_plan(spec, layout, rank, provider)
        print(json.dumps(row) if args.json else
              f"{provider}: rank {rank} of {row['world']}: plan {row['plan_s']:.3f}s, owned {row['owned_s']:.3f}s "
              f"({row['owned_boxes']} boxes), reduction groups {row['groups_s']:.3f}s ({row['reduction_groups']}), "
              f"memory {row['memory_s']:.3f}s; total {row['total_s']:.3f}s")


def cmd_bench_reduce_scatter(args) -> None:
    if args.megabytes <= 0:
        raise ValueError(f"--megabytes must be > 0, not {args.megabytes}")
    row = launch(bench_reduce_scatter_rank, args.world, args.megabytes, args.repeats)
    print(json.dumps(row) if args.json else
          f"{row['block_bytes'] / 1e6:.1f} MB block over {row['world']} ranks: shared memory "
          f"{row['shared_memory_s'] * 1e3:.1f} ms ({row['shared_memory_bytes'] / 1e6:.1f} MB moved per rank, a "
          f"reduce-scatter's), gloo {row['gloo_s'] * 1e3:.1f} ms ({row['gloo_bytes'] / 1e6:.1f} MB), memcpy "
          f"{row['memcpy_s'] * 1e3:.1f} ms; same sums: {row['same_sums']}")


def cmd_bench_export(args) -> None:
    import tempfile

    _plan_everywhere(args.checkpoint, Layout(args.tp))
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        row = launch(bench_export_rank, _world(args), args.checkpoint, args.tp, work)
    print(json.dumps(row) if args.json else
          f"export {row['export_s']:.2f}s vs sequential write {row['sequential_write_s']:.2f}s, parallel write "
          f"{row['parallel_write_s']:.2f}s ({row['bytes'] / 1e6:.0f} MB), save sharded {row['save_sharded_s']:.2f}s, "
          f"reshard {row['reshard_s']:.2f}s")
