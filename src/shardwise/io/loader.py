"""From checkpoint bytes to a rank's tensors: spec -> plan -> boxes read into one arena.

The source may be an HF safetensors checkpoint or a shardwise sharded checkpoint saved
under any other layout; both answer ``read(box, dst)``, so loading and resharding are
the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..dist.comm import make_comm
from ..model.forward import Model
from ..model.weight_only import quantize_weights, with_int8
from ..plan.mesh import Layout
from ..plan.rank import PROVIDERS, plan_rank
from ..plan.series import Series
from ..plan.spec import load_spec
from ..plan.tp import TpPlan
from ..progress import progress_bar
from ..providers.base import Provider
from ..providers.resident import Resident
from ..providers.series import series_provider
from ..providers.weights import (
    Weights,
    allocate,
    buffer_dtype,
    can_populate_behind,
    pinned,
    populated_behind,
    resolve_device,
)
from ..providers.zero3 import Zero3
from .prompt_table import load_tables
from .reader import MANIFEST, Checkpoint
from .sharded import ShardedCheckpoint

log = logging.getLogger("shardwise.loader")  # the name its log lines have always carried


def open_source(path: str | Path) -> Checkpoint | ShardedCheckpoint:
    path = Path(path)
    return ShardedCheckpoint(path) if (path / MANIFEST).exists() else Checkpoint(path)


def load_weights(path: str | Path, layout: Layout | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", rank: int | None = None, progress: bool = True,
                 provider: str = "resident", series: tuple[Series, ...] = ()) -> Weights:
    """This rank's tensors under ``layout`` and ``provider`` (with its ``series``), from an HF or a sharded checkpoint.

    ``dtype=None`` keeps each tensor in the checkpoint's own dtype, so a reshard is
    bit-exact. Aliased tensors share one allocation and one read.
    """
    layout = layout or Layout()
    rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
    spec = load_spec(path)
    plan = plan_rank(spec, layout, rank, provider, tuple(series))
    with open_source(path) as source:
        source.check(spec)
        int8 = source.int8_names(plan) if isinstance(source, ShardedCheckpoint) else set()
        if int8 and provider != "resident":
            raise ValueError(f"{path} holds int8 weight-only weights, which the resident provider holds, not "
                             f"provider {provider!r}")
        source_dtypes = {name: source.source_dtype(name) for name in spec.tensors()}
        dtypes = [dtype or buffer_dtype(b, plan, source_dtypes) for b in plan.buffers]
        flats, tensors = allocate(plan, dtypes, resolve_device(device), populate=not can_populate_behind())
        weights = Weights(plan, tensors, source_dtypes, Path(path), flats)
        unique = weights.unique()
        reads = sorted(((name, box) for name in unique if name not in int8 for box in plan.tensors[name].boxes),
                       key=lambda read: source.place(read[1]))  # each file front to back
        with populated_behind(list(flats.values())):  # the buffers' pages are faulted in while the reads wait
            for name, box in progress_bar(reads, progress and rank == 0, total=len(reads),
                                          desc=f"rank {rank} loading", unit="box"):
                source.read(box, unique[name])
        if int8:  # as stored: int8 values and their scales; export dequantizes to the dtype they were quantized from
            made = with_int8(tensors, {name: lambda n, t: source.read_int8(plan.tensors[n], dtype, t.device)
                                       for name in int8})
            weights = replace(weights, tensors=made, buffers={}, int8_head=source.int8_head,
                              source_dtypes=source_dtypes | source.int8_dtypes)
    return weights


def load_model(checkpoint_dir: str | Path, layout: Layout | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, progress: bool = True, provider: str = "resident",
               work_dtype: torch.dtype | None = None, prefetch: int = 1, offload: bool = False,
               series: tuple[Series, ...] = (), tp_plan: Mapping[str, str] | str | Path | None = None,
               weight_only: str | None = None, quantize_head: bool = False,
               prompt_tables: Mapping[str, str | Path] | None = None) -> Model:
    """Load this rank's part of a checkpoint (HF or sharded) under ``layout``; collective over the layout's world.

    ``provider="resident"`` keeps every work weight on the rank (DP replicas are plain
    data parallelism). ``provider="zero3"`` keeps 1/dp of each block in ``dtype`` (the
    master dtype) and gathers blocks on demand in ``work_dtype`` (None: the same;
    ``torch.float8_e4m3fn`` or ``torch.int8`` quantize the gather and compute in
    ``dtype``), ``prefetch`` blocks ahead, with the masters in host memory if ``offload``.
    ``provider="series"`` keeps weights resident except the ``series`` it declares
    (e.g. ``(Series("*.o"), Series("*.down", prefetch=2))``), whose layers are each
    stored by one DP rank: read in place from shared memory by the DP ranks of its host, and broadcast to
    others just before use.

    ``tp_plan`` (a dict in HF's vocabulary, ``{"layers.*.mlp.gate_proj": "colwise", ...}``, or the path of a
    JSON file holding one) replaces the model's TP plan (``shardwise.tp_plan(path)``): what it leaves out is
    replicated. It may also come as ``layout.tp_plan``.

    ``weight_only="int8"`` (resident provider) quantizes each rank's projections at load to int8 with one
    scale per output row and computes them with int8 weights (``model.weight_only``); the LM head too with
    ``quantize_head``.

    ``prompt_tables`` ({task: directory of a PEFT prompt-tuning adapter}) loads a virtual-token table per task,
    which ``generate(..., task=...)`` prepends (``io.prompt_table``).

    The model holds process groups and shared memory: ``close()`` it, or use it as a
    context manager, when loading more than one per process.
    """
    layout = layout or Layout()
    if tp_plan is not None:
        layout = replace(layout, tp_plan=TpPlan.of(tp_plan))
    device = resolve_device(device)
    check_provider_options(provider, dtype, work_dtype, prefetch, offload)
    check_weight_only(weight_only, provider)
    comm = make_comm(layout, device)
    source: Provider | None = None
    try:
        weights = load_weights(checkpoint_dir, layout, dtype, "cpu" if offload else device, comm.rank, progress,
                               provider, series)
        if offload and device.type != "cpu":
            weights = pinned(weights)
        if provider == "zero3":
            source = Zero3(weights.plan, comm, weights.buffers, work_dtype, prefetch, offload, device)
        elif provider == "series":
            source = series_provider(weights.plan, comm, weights.tensors, device)
            weights = replace(weights, tensors=source.tensors, buffers={})  # an owner's layers moved to the segment
        else:
            if weights.int8_head is not None and not weight_only:
                raise ValueError(f"{checkpoint_dir} holds int8 weight-only weights: load it with weight_only='int8' "
                                 "(--weight-only int8)")
            if weight_only:  # a head stored int8 stays so; a tied head's copy, or a full one asked for, is made here
                head = quantize_head or bool(weights.int8_head)
                tensors = quantize_weights(weights.plan, weights.tensors, comm.tp_group, head)
                weights = replace(weights, tensors=tensors, buffers={}, int8_head=head)
            source = Resident(weights.plan, weights.tensors)
        model = Model(weights, comm, source, device)
        if prompt_tables:
            model.prompts = load_tables(prompt_tables, weights.plan, model.dtype, device)
    except BaseException:
        if source is not None:
            source.close()
        comm.close(sync=False)  # the peers may have failed too, or be stuck waiting: no barrier
        raise
    log.info("rank %d loaded %d tensors, %.1f MB", comm.rank, len(weights.tensors),
             sum(source.nbytes().values()) / 1e6)
    return model


@dataclass(frozen=True)
class Provide:
    """How weights reach the layers: ``load_model``'s provider options, as the CLI passes them to every rank."""

    provider: str = "resident"
    work_dtype: torch.dtype | None = None
    prefetch: int = 1
    offload: bool = False
    series: tuple[Series, ...] = ()
    weight_only: str | None = None
    quantize_head: bool = False


WEIGHT_ONLY = ("int8",)


def check_weight_only(weight_only: str | None, provider: str, flags: bool = False) -> None:
    """Weight-only quantization is a resident model's: refuse an unknown kind or another provider in one line."""
    if weight_only is not None and weight_only not in WEIGHT_ONLY:
        raise ValueError(f"unknown weight_only {weight_only!r} (choose from {', '.join(WEIGHT_ONLY)})")
    if weight_only and provider != "resident":
        need = "--weight-only needs --provider resident" if flags else "weight_only needs provider='resident'"
        raise ValueError(f"{need}: ZeRO-3 quantizes its gathers instead (work dtype int8)")


WORK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8)


def check_provider_options(provider: str, dtype: torch.dtype, work_dtype: torch.dtype | None, prefetch: int,
                           offload: bool, flags: bool = False) -> None:
    """Refuse option combinations that mean nothing, before any rank loads a byte (``plan_rank`` checks the
    series declarations, against the model). ``flags``: name the options as the command line spells them."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    if provider != "zero3" and (work_dtype is not None or offload):
        need = ("--work-dtype and --offload need --provider zero3" if flags else
                "work_dtype and offload need provider='zero3'")
        raise ValueError(f"{need}: resident weights are computed as loaded")
    if work_dtype is not None and work_dtype not in WORK_DTYPES:
        raise ValueError(f"work_dtype {work_dtype} is not one of {', '.join(map(str, WORK_DTYPES))}")
    if dtype not in WORK_DTYPES[:3]:
        raise ValueError(f"dtype {dtype} cannot hold masters or compute; use float32, bfloat16 or float16")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
