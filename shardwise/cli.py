"""The `shardwise` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import defaultdict

import torch

from .bench import bench_export_rank, bench_generate_rank, bench_load_rank, warm_page_cache
from .generate import GenerateArgs, generate_rank
from .launch import LaunchInterrupted, RankError, in_torchrun, launch
from .layout import Layout, plan_rank
from .publish import check_target
from .spec import DTYPES, load_spec


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def _layout_args(p: argparse.ArgumentParser, tp_required: bool = True) -> None:
    p.add_argument("--tp", type=int, required=tp_required, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (stages)")


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at the destination (never anything else)")


def _world(args) -> int:
    world = args.tp * args.pp
    if in_torchrun() and int(os.environ["WORLD_SIZE"]) != world:
        sys.exit(f"--tp {args.tp} x --pp {args.pp} = {world} ranks, but torchrun started {os.environ['WORLD_SIZE']}")
    return world


def cmd_generate(args) -> None:
    job = GenerateArgs(args.checkpoint, args.tp, args.pp, args.prompt, args.max_new_tokens, args.dtype,
                       args.device, args.chat, args.temperature, args.top_k, args.top_p, args.seed)
    result = launch(generate_rank, _world(args), job)
    if not in_torchrun() or int(os.environ["RANK"]) == 0:
        rss = " ".join(f"r{r}={b / 2**20:.0f}MiB" for r, b in enumerate(result["rss"]))
        print(f"[shardwise] tp={args.tp} pp={args.pp} load {result['load_s']:.2f}s, "
              f"{result['new_tokens']} tokens at {result['tokens_per_s']:.1f} tok/s, rss {rss}", file=sys.stderr)


KINDS = {
    "embed": "embedding", "lm_head": "lm_head", "norm": "norms", "attn_norm": "norms", "mlp_norm": "norms",
    "q_norm": "norms", "k_norm": "norms", "qkv": "attention", "qkv_bias": "attention", "o": "attention",
    "o_bias": "attention", "gate_up": "mlp", "gate_up_bias": "mlp", "down": "mlp", "down_bias": "mlp",
}


def plan_table(path: str, layout: Layout, dtype: torch.dtype | None) -> str:
    """Bytes each rank will hold, by tensor kind, as a fixed-width table."""
    spec = load_spec(path)
    dtype = dtype or spec.dtype
    columns = ["embedding", "attention", "mlp", "norms", "lm_head"]
    lines = [f"{spec.arch}: {spec.layers} layers, {spec.heads} heads / {spec.kv_heads} KV heads, vocab {spec.vocab}, "
             f"tp={layout.tp} pp={layout.pp}, {str(dtype).removeprefix('torch.')}",
             f"{'rank':>4} {'stage':>5} {'tp':>3} {'layers':>9} {'q/kv heads':>10} "
             + " ".join(f"{c:>11}" for c in columns) + f" {'total':>11}"]
    for rank in range(layout.world_size):
        plan = plan_rank(spec, layout, rank)
        kinds: dict[str, int] = defaultdict(int)
        seen = set()
        for name, t in plan.tensors.items():
            if (t.shape, t.boxes) not in seen:
                seen.add((t.shape, t.boxes))
                kinds[KINDS[name.split(".")[-1]]] += t.numel * dtype.itemsize
        layers = f"{plan.layers.start}-{plan.layers.stop - 1}"
        heads = f"{plan.heads.n_q}/{plan.heads.n_kv}"
        lines.append(f"{rank:>4} {plan.stage:>5} {plan.tp_rank:>3} {layers:>9} {heads:>10} "
                     + " ".join(f"{_mb(kinds[c]):>11}" for c in columns) + f" {_mb(plan.nbytes(dtype)):>11}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def cmd_plan(args) -> None:
    print(plan_table(args.path, Layout(args.tp, args.pp), args.dtype))


def cmd_bench_load(args) -> None:
    warm_page_cache(args.checkpoint)
    rows = launch(bench_load_rank, _world(args), args.checkpoint, args.tp, args.pp, args.dtype, args.hf)
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            hf = f", HF {row['hf_load_s']:.3f}s" if "hf_load_s" in row else ""
            print(f"rank {row['rank']}: load {row['load_s']:.3f}s (floor {row['floor_s']:.3f}s{hf}), "
                  f"{row['shard_bytes'] / 1e6:.1f} MB, peak RSS growth x{row['rss_ratio']:.2f}")


def cmd_bench_generate(args) -> None:
    row = launch(bench_generate_rank, _world(args), args.checkpoint, args.tp, args.pp, args.prompt,
                 args.max_new_tokens, not args.no_hf)
    if args.json:
        print(json.dumps(row))
        return
    hf = f"{row['hf_tok_s']:.2f} tok/s" if "hf_tok_s" in row else row.get("hf_error", "not run")
    print(f"tp={args.tp} pp={args.pp}: shardwise {row['shardwise_tok_s']:.2f} tok/s, HF tp_plan {hf}")


def cmd_import_gguf(args) -> None:
    from .gguf_import import import_gguf

    out = import_gguf(args.gguf, args.out_dir, args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def reshard_rank(src: str, dst: str, tp: int, pp: int, overwrite: bool) -> None:
    from .loader import load_weights
    from .sharded import save_sharded

    save_sharded(load_weights(src, Layout(tp, pp)), dst, overwrite=overwrite)


def export_rank(src: str, out: str, tp: int, pp: int, overwrite: bool) -> None:
    from .hf_export import export
    from .loader import load_weights

    export(load_weights(src, Layout(tp, pp)), out, overwrite=overwrite)


def cmd_reshard(args) -> None:
    check_target(args.dst, args.overwrite, [args.src])  # before spawning: a refusal costs nothing
    launch(reshard_rank, _world(args), args.src, args.dst, args.tp, args.pp, args.overwrite)
    print(f"wrote {args.dst} (sharded, tp={args.tp} pp={args.pp})")


def cmd_export(args) -> None:
    from .sharded import ShardedCheckpoint

    check_target(args.out, args.overwrite, [args.src])
    source = ShardedCheckpoint(args.src)
    source.check(load_spec(args.src))  # the manifest's layout says how many ranks to spawn: vet it first
    layout = source.layout
    launch(export_rank, layout.world_size, args.src, args.out, layout.tp, layout.pp, args.overwrite)
    print(f"wrote {args.out} (HF safetensors, exported by {layout.world_size} ranks)")


def cmd_bench_export(args) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        row = launch(bench_export_rank, _world(args), args.checkpoint, args.tp, work)
    print(json.dumps(row) if args.json else
          f"export {row['export_s']:.2f}s vs sequential write {row['sequential_write_s']:.2f}s "
          f"({row['bytes'] / 1e6:.0f} MB), save sharded {row['save_sharded_s']:.2f}s, reshard {row['reshard_s']:.2f}s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardwise", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text on N ranks (spawns them, or joins a torchrun world)")
    g.add_argument("checkpoint")
    _layout_args(g, tp_required=False)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--dtype", type=_dtype, default=torch.float32)
    g.add_argument("--device", default="cpu", help="cpu or cuda (each rank takes its LOCAL_RANK GPU)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("import-gguf", help="convert a llama.cpp GGUF file to an HF-format checkpoint")
    i.add_argument("gguf")
    i.add_argument("out_dir")
    i.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="dtype of the written tensors")
    _overwrite_arg(i)
    i.set_defaults(func=cmd_import_gguf)

    r = sub.add_parser("reshard", help="HF or sharded checkpoint -> sharded checkpoint under a new layout")
    r.add_argument("src")
    r.add_argument("dst")
    _layout_args(r)
    _overwrite_arg(r)
    r.set_defaults(func=cmd_reshard)

    e = sub.add_parser("export", help="sharded checkpoint -> HF safetensors checkpoint, written by all its ranks")
    e.add_argument("src")
    e.add_argument("out")
    _overwrite_arg(e)
    e.set_defaults(func=cmd_export, tp=1, pp=1)

    p = sub.add_parser("plan", help="bytes each rank will hold, per tensor kind")
    p.add_argument("path", help="checkpoint directory or config.json")
    _layout_args(p)
    p.add_argument("--dtype", type=_dtype, help="dtype the ranks will hold (default: the config's)")
    p.set_defaults(func=cmd_plan)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bl = b.add_parser("load", help="per-rank load time, bytes and peak RSS, against a read floor and HF")
    bl.add_argument("checkpoint")
    _layout_args(bl)
    bl.add_argument("--dtype", type=_dtype, default=torch.bfloat16)
    bl.add_argument("--hf", action="store_true", help="also time HF from_pretrained(tp_plan='auto') in the same run")
    bl.add_argument("--json", action="store_true", help="one JSON object per rank per line")
    bl.set_defaults(func=cmd_bench_load)
    bg = b.add_parser("generate", help="greedy fp32 tokens/s of shardwise and HF tp_plan='auto', side by side")
    bg.add_argument("checkpoint")
    _layout_args(bg)
    bg.add_argument("--prompt", default="What is the capital of France?")
    bg.add_argument("--max-new-tokens", type=int, default=64)
    bg.add_argument("--no-hf", action="store_true", help="skip the HF measurement")
    bg.add_argument("--json", action="store_true")
    bg.set_defaults(func=cmd_bench_generate)
    be = b.add_parser("export", help="parallel HF export vs one sequential write of the same bytes; reshard time")
    be.add_argument("checkpoint")
    _layout_args(be)
    be.add_argument("--work-dir", default=None, help="where to write (default: the system temp dir)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench_export)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
        if args.verbose or e.__cause__ is None:
            raise
        sys.exit(f"shardwise: rank {e.rank}: {type(e.__cause__).__name__}: {e.__cause__}")
    except (ValueError, OSError) as e:
        if args.verbose:
            raise
        sys.exit(f"shardwise: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
