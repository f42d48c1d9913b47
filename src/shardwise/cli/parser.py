"""The `shardwise` command line."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from .. import __version__
from ..bench.series import PATTERNS
from ..launch import LaunchInterrupted, RankError
from ..plan.rank import PROVIDERS
from ..plan.spec import DTYPES
from .args import (
    POSITIVE,
    SEED,
    _bounded,
    _dtype,
    _layout_args,
    _overwrite_arg,
    _provider_args,
    _series_arg,
    _written_dtype_arg,
)
from .bench import (
    cmd_bench_decode,
    cmd_bench_export,
    cmd_bench_generate,
    cmd_bench_load,
    cmd_bench_moe,
    cmd_bench_plan,
    cmd_bench_reduce_scatter,
    cmd_bench_series,
    cmd_bench_train,
    cmd_bench_zero3,
)
from .checkpoints import cmd_export, cmd_import_gguf, cmd_init, cmd_reshard
from .generate import cmd_generate
from .plan import cmd_plan
from .train import cmd_train


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
    g.add_argument("--prompt-table", action="append", default=[], metavar="[TASK=]DIR",
                   help="a PEFT prompt-tuning adapter, as TASK's table (default: the task shardwise train trained "
                   "it for, else DIR's last part); repeat")
    g.add_argument("--task", help="prepend this task's prompt table to every prompt")
    _provider_args(g)

    t = command(sub, "train", "fine-tune a checkpoint on a text file, on N ranks, and save it sharded", cmd_train)
    t.add_argument("checkpoint")
    t.add_argument("--data", required=True, metavar="FILE", help="a text file, tokenized with the checkpoint's "
                   "tokenizer; paragraphs joined with its EOS")
    t.add_argument("--steps", type=POSITIVE, required=True, help="optimizer steps in all (with --resume, the saved "
                   "ones included)")
    t.add_argument("--train", choices=("weights", "prompt-table"), default="weights",
                   help="what is trained: the model's weights, or a new prompt table before the frozen model, saved "
                   "as a PEFT prompt-tuning adapter that generate --prompt-table loads")
    t.add_argument("--virtual-tokens", type=POSITIVE, metavar="N", help="the prompt table's length (--train "
                   "prompt-table)")
    t.add_argument("--task", help="the prompt table's task name, which generate --prompt-table DIR gives it "
                   "(default: the resumed run's, else the --save directory's name)")
    t.add_argument("--init-text", metavar="TEXT", help="start the prompt table from the embeddings of this text's "
                   "tokens, repeated to N (PEFT's TEXT init); default: of N token ids drawn from --seed")
    t.add_argument("--resume", metavar="DIR", help="a training checkpoint that shardwise train saved (at any layout) "
                   "from CHECKPOINT, or a prompt table it trained: go on from its step, with its weights (or table) "
                   "and AdamW state, on the same data")
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
    _provider_args(t, inference=False)
    t.set_defaults(dtype=torch.float32)
    t.add_argument("--save", required=True, metavar="DIR", help="where the trained sharded checkpoint (or prompt "
                   "table) goes; may be the --resume DIR itself, which each save then replaces with a later step")
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
    e.set_defaults(tp=1, pp=1, dp=1, tp_plan=None)

    p = command(sub, "plan", "bytes each rank will hold, per tensor kind", cmd_plan)
    p.add_argument("path", help="checkpoint directory or config.json")
    _layout_args(p)
    p.add_argument("--dtype", type=_dtype, default="float32", help="dtype the ranks will hold, as generate's")
    _provider_args(p)
    p.add_argument("--train", action="store_true", help="add what shardwise train holds: gradient sums, AdamW "
                   "moments, a step's work buffers and staging (resident or zero3, float32)")
    p.add_argument("--show-tp-plan", action="store_true", help="print the TP plan in force (--tp-plan's, else "
                   "config.json's base_model_tp_plan, else the architecture's) as JSON, in HF's vocabulary")

    b = command(sub, "bench", "benchmarks", None).add_subparsers(dest="bench", required=True)
    bl = command(b, "load", "per-rank load time, bytes and peak RSS, against a read floor and HF", cmd_bench_load)
    bl.add_argument("checkpoint")
    _layout_args(bl)
    bl.add_argument("--dtype", type=_dtype, default="float32", help="dtype the ranks load into")
    _provider_args(bl)
    bl.add_argument("--hf", action="store_true", help="also time HF from_pretrained(tp_plan='auto') in the same run")
    bl.add_argument("--cold", action="store_true",
                    help="drop the checkpoint's pages before the load, and time one sequential cold read of it too")
    bl.add_argument("--json", action="store_true", help="one JSON object per rank per line")
    bm = command(b, "moe", "a mixture of experts' prefill and decode tokens/s: --ep N, EP 1 and HF",
                 cmd_bench_moe)
    bm.add_argument("checkpoint")
    _layout_args(bm)
    bm.add_argument("--dtype", type=_dtype, default="float32", help="dtype the model computes in")
    bm.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="decode steps to time")
    bm.add_argument("--batch", type=POSITIVE, default=32, help="sequences decoded together (32 keeps every expert "
                    "busy each step)")
    bm.add_argument("--json", action="store_true", help="one JSON object: a row per setting")
    bd = command(b, "decode", "batch-1 decode ms/token: bf16 and int8 weight-only, HF bf16 and torchao int8",
                 cmd_bench_decode)
    bd.add_argument("checkpoint")
    _layout_args(bd)
    bd.add_argument("--max-new-tokens", type=POSITIVE, default=32, help="decode steps to time")
    bd.add_argument("--no-hf", action="store_true", help="skip HF's model and torchao's")
    bd.add_argument("--json", action="store_true", help="one JSON list: a row per setting")
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
    bt.add_argument("--pp", type=POSITIVE, default=1, help="instead: resident training over N pipeline stages (one "
                    "rank each) against one stage, with the 1F1B bubble measured and in theory")
    bt.add_argument("--accumulate", type=POSITIVE, default=4, help="with --pp: micro-batches (of --batch sequences) "
                    "per step")
    bt.add_argument("--sp", action="store_true", help="instead: resident training at TP --world with and without "
                    "sequence parallelism, at seq 128 and --seq: the activation memory (the difference of the peaks) "
                    "and tokens/s of each")
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
    bp = command(b, "plan", "one rank's planning time at a layout's full size (plan, ownership, reduction groups, "
                 "memory), from a config", cmd_bench_plan)
    bp.add_argument("path", help="checkpoint directory or config.json (no weights needed)")
    _layout_args(bp)
    bp.add_argument("--rank", type=_bounded(int, 0), default=None, help="the rank to plan (default: the last, which "
                    "consults the most others)")
    bp.add_argument("--provider", choices=("resident", "zero3"), action="append", default=None,
                    help="repeat for several (default: resident and zero3)")
    bp.add_argument("--json", action="store_true", help="one JSON object per provider")
    br = command(b, "reduce-scatter", "ZeRO-3's gradient reduction of one block over DP: shared memory against gloo",
                 cmd_bench_reduce_scatter)
    br.add_argument("--world", type=_bounded(int, 2), default=2, help="ranks, all in one DP group")
    br.add_argument("--megabytes", type=float, default=50.0, help="the block's fp32 gradient size")
    br.add_argument("--repeats", type=POSITIVE, default=10, help="timed calls per path (median)")
    br.add_argument("--json", action="store_true")
    be = command(b, "export", "parallel HF export vs a sequential and a parallel raw write of its bytes; reshard time",
                 cmd_bench_export)
    be.add_argument("checkpoint")
    be.add_argument("--tp", type=POSITIVE, default=1, help="tensor-parallel degree of the export (reshard: PP=TP)")
    be.set_defaults(pp=1, dp=1, ep=1, sp=False, expert_placement="contiguous", tp_plan=None)
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
