"""What every command shares: argument types and groups (dtype, layout, provider, series, overwrite), and the
checks made before any rank is spawned."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from ..io.loader import WEIGHT_ONLY, Provide, check_provider_options, check_weight_only
from ..launch import in_torchrun
from ..plan.mesh import PLACEMENTS, Layout
from ..plan.rank import PROVIDERS, plan_rank
from ..plan.series import Series, SeriesError
from ..plan.spec import DTYPES, load_spec
from ..plan.tp import TpPlan
from ..words import plural


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
    p.add_argument("--ep", type=POSITIVE, default=1, help="expert-parallel degree: ranks that share out a mixture "
                   "of experts' routed experts (each reads and computes only its own)")
    p.add_argument("--expert-placement", choices=PLACEMENTS, default="contiguous",
                   help="which experts each EP rank holds: a contiguous run each, or every ep-th (round-robin)")
    p.add_argument("--sp", action="store_true", help="sequence parallelism: between the TP blocks (norms, residual "
                   "adds) each TP rank holds its share of the tokens (needs --tp > 1)")
    p.add_argument("--tp-plan", metavar="FILE.json", help="a TP plan in HF's vocabulary replacing the model's "
                   "('shardwise plan --show-tp-plan' prints it): module pattern -> style; what it leaves out is "
                   "replicated")


def _series(text: str) -> Series:
    try:
        return Series.parse(text)
    except SeriesError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _series_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--series", type=_series, action="append", default=[], metavar="PATTERN[,k=K][,layers=LO:HI]",
                   help="series: one tensor per layer (e.g. '*.o', '*.down'), each layer stored by one DP rank and "
                        "broadcast k layers ahead (k default 1); repeat for several series")


def _provider_args(p: argparse.ArgumentParser, inference: bool = True) -> None:
    """The provider flags; ``inference``: also int8 weight-only (training updates full-precision masters)."""
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
    if not inference:
        return
    p.add_argument("--weight-only", choices=WEIGHT_ONLY, default=None,
                   help="resident: quantize the projections at load (int8, a scale per output row) and compute "
                        "with int8 weights")
    p.add_argument("--quantize-head", action="store_true", help="--weight-only: the LM head too (default: kept in "
                   "--dtype, where quantization error shows most and a tied head would need a copy)")


def _layout(args) -> Layout:
    """The mesh and TP plan the flags ask for (a plan file is read, not yet checked against the model)."""
    return Layout(args.tp, args.pp, args.dp, None if args.tp_plan is None else TpPlan.of(args.tp_plan), args.ep,
                  args.expert_placement, args.sp)


def _provide(args) -> Provide:
    """The provider options, checked before any rank is spawned."""
    check_provider_options(args.provider, args.dtype, args.work_dtype, args.prefetch, args.offload, flags=True)
    weight_only, head = getattr(args, "weight_only", None), getattr(args, "quantize_head", False)
    check_weight_only(weight_only, args.provider, flags=True)
    if head and not weight_only:
        raise ValueError("--quantize-head needs --weight-only")
    return Provide(args.provider, args.work_dtype, args.prefetch, args.offload, tuple(args.series), weight_only, head)


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
        sys.exit(f"--tp {args.tp} x --pp {args.pp} x --dp {args.dp} x --ep {args.ep} = {plural(world, 'rank')}, "
                 f"but torchrun started {os.environ['WORLD_SIZE']}")
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
    layout (and any series) checked on every position of a replica: what a spawned job would find, in a second."""
    spec = load_spec(path if config_file else _checkpoint_dir(path))
    for rank in layout.replica(0):
        plan_rank(spec, layout, rank, provider, series)
    return spec


def _report(message: str) -> None:
    if _is_rank0():
        print(message)
