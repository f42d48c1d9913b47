"""`shardwise plan`: the bytes each rank will hold, by tensor kind, as a table."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import torch

from ..io.loader import Provide
from ..model import weight_only
from ..plan.mesh import Layout
from ..plan.rank import plan_rank
from ..plan.spec import load_spec
from ..plan.tp import plan_in_force, resolve
from ..providers.series import series_memory
from ..providers.zero3 import memory_plan
from ..words import plural
from .args import _layout, _provide


def plan_table(path: str, layout: Layout, dtype: torch.dtype | None, provide: Provide | None = None,
               train: bool = False) -> str:
    """Bytes each rank will hold, by tensor kind (its masters, under ZeRO-3), plus ZeRO-3's buffers or a series'
    windows, as a table; under a series, what each series saves. With ``train``, what ``shardwise train`` holds:
    fp32 masters, their gradient sums, AdamW's moments, and a step's work buffers and staging."""
    from ..train.step import TRAINABLE
    from ..train.weights import training_memory

    spec = load_spec(path)
    dtype = dtype or (torch.float32 if train else spec.dtype)
    provide = provide or Provide()
    if train and (provide.provider not in TRAINABLE or layout.pp > 1 or dtype != torch.float32):
        raise ValueError(f"--train plans what shardwise train holds: --provider {' or '.join(TRAINABLE)}, --pp 1 and "
                         f"float32 masters, not --provider {provide.provider} --pp {layout.pp} --dtype "
                         f"{str(dtype).removeprefix('torch.')}")
    zero3, series = provide.provider == "zero3", provide.provider == "series"
    columns = ["embedding", "attention", "mlp", *(["experts"] if spec.experts else []), "norms", "lm_head"]
    columns += ["gradients", "moments", "work", "staging"] if train else ["work", "staging"] if zero3 else \
        ["windows"] if series else []
    how = provide.provider
    if zero3:
        work = str(provide.work_dtype or dtype).removeprefix("torch.")
        how += f" (work {work}, prefetch {provide.prefetch}{', offload' if provide.offload else ''})"
    how += ", training" if train else ""
    how += f", weight-only {provide.weight_only}{' with the head' if provide.quantize_head else ''}" \
        if provide.weight_only else ""
    lines = [f"{spec.arch}: {plural(spec.layers, 'layer')}, {plural(spec.heads, 'head')} / "
             f"{plural(spec.kv_heads, 'KV head')}, vocab {spec.vocab}, {layout}, {str(dtype).removeprefix('torch.')}, "
             f"{how}{'' if layout.tp_plan is None else ', ' + layout.tp_plan.origin}",
             f"{'rank':>4} {'stage':>5} {'dp':>3} {'tp':>3} {'layers':>9} {'q/kv heads':>10} "
             + (f"{'ep':>3} {'held':>8} " if spec.experts else "")
             + " ".join(f"{c:>11}" for c in columns) + f" {'total':>11}"]
    saved: dict[str, list[str]] = defaultdict(list)  # series -> one line per rank
    for rank in range(layout.world_size):
        plan = plan_rank(spec, layout, rank, provide.provider, provide.series)
        kinds: dict[str, int] = defaultdict(int)
        for buffer in plan.buffers:
            placed: dict[tuple, str] = {}  # an alias (a tied LM head) is its embedding's bytes: counted once
            for v in buffer.views:
                placed.setdefault((v.offset, v.shape), v.name.kind)
            for (_, shape), name in placed.items():
                kinds[spec.table.kind(name).report] += math.prod(shape) * dtype.itemsize
        total = plan.nbytes(dtype)
        if provide.weight_only:
            for name in weight_only.quantized(plan, provide.quantize_head):
                t, shared = plan.work[name], name in plan.alias
                kinds[spec.table.kind(name.kind).report] += weight_only.stored_bytes(t, dtype, shared)
            total = weight_only.nbytes(plan, dtype, provide.quantize_head)
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
        experts = f"{layout.ep_rank(rank):>3} {_held(plan.experts):>8} " if spec.experts else ""
        lines.append(f"{rank:>4} {plan.stage:>5} {plan.dp_rank:>3} {plan.tp_rank:>3} {layers:>9} {heads:>10} "
                     + experts + " ".join(f"{_mb(kinds[c]):>11}" for c in columns) + f" {_mb(total):>11}")
    if train:
        lines.append("training: fp32 masters by kind, their gradient sums and AdamW's two moments; work and staging as "
                     "a step allocates them (zero3: gathered blocks; cast chunks, the per-block DP gradient buffers, "
                     "offload's fetch and optimizer buffers); activations not counted")
    if train and provide.offload:
        lines.append("--offload: masters, gradients and moments are in host memory; the device holds work and staging")
    if zero3 and layout.dp > 1:
        lines.append("work and staging as for gloo gathers; DP ranks on one host share the work buffers in shared "
                     "memory and cast in place, with no staging")
    if saved:
        lines.append("windows as for DP ranks on different hosts, which broadcast the series layers; DP ranks on one "
                     "host read the owners' layers in place from shared memory, with no windows")
    lines += [f"series {name} {line}" for name, held in saved.items() for line in held]
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def cmd_plan(args) -> None:
    layout = _layout(args)
    if args.show_tp_plan:
        spec = load_spec(args.path)
        resolve(spec, layout.tp_plan)
        print(json.dumps(plan_in_force(spec, layout.tp_plan).as_dict(), indent=2))
        return
    print(plan_table(args.path, layout, args.dtype, _provide(args), args.train))


def _held(experts: range) -> str:
    """A rank's experts: a run as ``lo-hi``, round-robin as a slice (``1::4``: every 4th from 1)."""
    if len(experts) == 1:
        return str(experts.start)
    return f"{experts.start}-{experts[-1]}" if experts.step == 1 else f"{experts.start}::{experts.step}"
