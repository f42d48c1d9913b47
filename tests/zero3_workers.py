"""What the ZeRO-3 tests run inside spawned ranks, or in the test process itself for a one-rank world.

A launch runs a list of jobs (a function of this module and its arguments) on every
rank and returns, per job, every rank's result, so one launch serves every check of a
world size.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from shared_launch import everyone

import shardwise.io.reader as reader
from shardwise import Layout, Model, RankPlan, export, load_model, load_spec, load_weights, save_sharded
from shardwise.model.init import init_weights

QUANTIZED = (torch.float8_e4m3fn, torch.int8)
LIMITS = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
ROUNDING = 2.0**-22  # two fp32 roundings (x / s, then q * s), relative: the bound's slack


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# Reading.


PAGE = 4096


def touched_pages(entry: reader.Entry, box) -> tuple[int, int]:
    """Bytes of the file pages holding a (2-D or 1-D) box's elements, which is what reading it through ``mapped_box``
    brings in, and the number of contiguous runs (rows) those elements form."""
    width = math.prod(entry.shape[1:])
    runs = range(box.start[0], box.stop[0]) if len(entry.shape) > 1 else [0]
    pages = set()
    for row in runs:
        lo = row * width + (box.start[1] if len(entry.shape) > 1 else box.start[0])
        hi = row * width + (box.stop[1] if len(entry.shape) > 1 else box.stop[0])
        a, b = entry.begin + lo * entry.dtype.itemsize, entry.begin + hi * entry.dtype.itemsize
        pages.update(range(a // PAGE, -(-b // PAGE)))
    return len(pages) * PAGE, len(runs)


@contextlib.contextmanager
def counting_reads() -> Iterator[dict[str, Any]]:
    """Count the bytes the reader's two low-level reads ask for (preadv) or map (mmap), and the calls.

    ``excess`` is the most any one read took beyond page rounding of its box (at most 0), and ``where`` that box.
    """
    counts: dict[str, Any] = {"bytes": 0, "reads": 0, "excess": -1, "where": None}
    pread, mapped = reader._pread_into, reader.mapped_box

    def counted_pread(fd: int, buf, offset: int, entry: reader.Entry) -> None:
        counts["bytes"] += memoryview(buf).nbytes
        counts["reads"] += 1
        pread(fd, buf, offset, entry)

    def counted_mapped(entry: reader.Entry, box, write: bool):
        touched, runs = touched_pages(entry, box)
        own = box.numel * entry.dtype.itemsize
        counts["bytes"] += touched
        counts["reads"] += runs
        excess = touched - own - 2 * PAGE * runs  # beyond page rounding at both ends of every run: none
        if excess > counts["excess"]:
            counts["excess"] = excess
            counts["where"] = f"{entry.name}[{box.start}:{box.stop}] of {list(entry.shape)}"
        return mapped(entry, box, write)

    reader._pread_into, reader.mapped_box = counted_pread, counted_mapped
    try:
        yield counts
    finally:
        reader._pread_into, reader.mapped_box = pread, mapped


def own_bytes(plan: RankPlan, dtypes: dict[str, torch.dtype]) -> int:
    """Bytes of every box the rank holds, in the checkpoint's dtype."""
    return sum(box.numel * dtypes[box.source].itemsize for t in plan.tensors.values() for box in t.boxes)


# Forward, generation and the weights a provider hands out.


def replica_ids(ids: torch.Tensor, layout: Layout, vocab: int) -> torch.Tensor:
    """Each DP replica feeds its own ids, as data parallelism does."""
    return (ids + 7 * layout.coords(rank())[1]) % vocab


def outputs(model: Model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    return model(ids), model.generate(ids, steps)


def work_tensors(model: Model) -> dict[str, torch.Tensor]:
    """Every work tensor the provider hands out, block by block through gather/get/release, copied."""
    out = {}
    provider = model.provider
    for block in model.plan.blocks:
        provider.gather(block)
        out |= {f"{block}.{short}": t.clone() for short, t in provider.get(block).items()}
        provider.release(block)
    return out


def scales(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quant.py's documented scales: ``m / 448`` per tensor (fp8), ``m / 127`` per row (int8), broadcastable to x."""
    x = x.float().abs()
    if dtype == torch.int8:
        m = x.amax(dim=-1, keepdim=True) if x.dim() == 2 else x.amax().reshape(1)
    else:
        m = x.amax().reshape((1,) * x.dim())
    return torch.where(m > 0, m / LIMITS[dtype], torch.ones_like(m))


def documented_bound(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quant.py's elementwise error bound, plus the slack of the two fp32 roundings it documents; 1-D tensors travel
    unquantized (only a zero-width bound, against a zero error)."""
    x = x.float()
    if x.dim() == 1:
        return torch.full_like(x, 1e-300, dtype=torch.float64)
    s = scales(x, dtype).expand_as(x)
    bound = s / 2 if dtype == torch.int8 else torch.maximum(x.abs() / 16, s / 512)
    return bound.double() + ROUNDING * (x.abs() + s).double()


def worst_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """The largest |quantized - fp32| / bound over every work tensor, and where it is."""
    worst = {"ratio": 0.0, "tensor": None, "err": 0.0, "bound": 0.0, "tensors": len(ref)}
    for name, x in ref.items():
        err = (got[name].double() - x.double()).abs()
        bound = documented_bound(x, dtype)
        ratio = err / bound
        i = int(ratio.argmax())
        if ratio.reshape(-1)[i] > worst["ratio"]:
            worst = dict(worst, ratio=float(ratio.reshape(-1)[i]), tensor=name, err=float(err.reshape(-1)[i]),
                         bound=float(bound.reshape(-1)[i]))
    return worst


def emulated(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x quantized and dequantized exactly as quant.py documents: ``q * s`` formed in fp32; 1-D tensors as they are."""
    if x.dim() == 1:
        return x
    s = scales(x, dtype)
    q = (x.float() / s).clamp(-LIMITS[dtype], LIMITS[dtype])
    q = q.round() if dtype == torch.int8 else q.to(dtype).float()
    return (q * s).to(x.dtype)


def compare_checkpoint(path: str, layout: Layout, ids: torch.Tensor, steps: int, quantized: bool) -> dict[str, Any]:
    """One checkpoint under one layout: resident vs ZeRO-3 in fp32 and bf16 work weights; fp8 and int8 gathers."""
    out: dict[str, Any] = {}
    with load_model(path, layout, progress=False) as resident:
        ids = replica_ids(ids, layout, resident.spec.vocab)
        out["ids"] = ids
        out["resident"] = outputs(resident, ids, steps)
        reference = work_tensors(resident)
        with counting_reads() as reads:
            zero3 = load_model(path, layout, provider="zero3", progress=False)
        with zero3:
            out["zero3"] = outputs(zero3, ids, steps)
            out["reads"] = dict(reads, own=own_bytes(zero3.plan, zero3.weights.source_dtypes),
                                pieces=len(zero3.plan.tensors))
        held = {id(t): t for t in resident.provider.tensors.values()}
        originals = {key: t.clone() for key, t in held.items()}
        for dtype in QUANTIZED if quantized else ():
            with load_model(path, layout, provider="zero3", work_dtype=dtype, progress=False) as narrow:
                out[f"bound {dtype}"] = worst_error(work_tensors(narrow), reference, dtype)
                out[f"quantized {dtype}"] = outputs(narrow, ids, steps)
            for key, t in held.items():  # the resident model on the documented quantization of its weights
                t.copy_(emulated(originals[key], dtype))
            out[f"emulated {dtype}"] = outputs(resident, ids, steps)
            for key, t in held.items():
                t.copy_(originals[key])
    with load_model(path, layout, dtype=torch.bfloat16, progress=False) as resident:
        out["resident bf16"] = outputs(resident, ids, steps)
    with load_model(path, layout, provider="zero3", work_dtype=torch.bfloat16, progress=False) as zero3:
        out["zero3 bf16"] = outputs(zero3, ids, steps)
    return out


def compare_layout(tp: int, pp: int, dp: int, paths: dict[str, str], ids: torch.Tensor, steps: int,
                   quantized: bool) -> dict:
    return {name: compare_checkpoint(path, Layout(tp, pp, dp), ids, steps, quantized) for name, path in paths.items()}


def eos_lockstep(paths: dict[str, str], ids: torch.Tensor, steps: int) -> dict[str, Any]:
    """ZeRO-3 at dp=2 with replicas that reach EOS at different steps: both finish, each with its own tokens.

    Replica d generates from row d of ``ids``. EOS is a token replica 0 picks before its last step and replica 1
    never picks, on the first checkpoint that has one (the checkpoints are random).
    """
    layout = Layout(dp=2)
    mine, prompt = ids[rank() : rank() + 1], ids.shape[1]
    for name, path in paths.items():
        with load_model(path, layout, progress=False) as resident:
            first, second = (t[0, prompt:].tolist() for t in everyone(resident.generate(mine, steps)))
            eos = next((t for t in first[:-1] if t not in second), None)
            if eos is None:
                continue
            alone = resident.generate(mine, steps, eos_token_id=eos)
        with load_model(path, layout, provider="zero3", progress=False) as zero3:
            together = zero3.generate(mine, steps, eos_token_id=eos)
        return {"checkpoint": name, "eos": eos, "alone": alone, "together": together}
    return {"checkpoint": None}


# Round trips and initialisation.


def reshard_zero3(srcs: dict[str, str], dsts: dict[str, str], tp: int, dp: int) -> dict[str, dict[str, Any]]:
    """HF -> ZeRO-3 master shards in the checkpoint's own dtypes -> sharded save; the bytes each load read."""
    reads = {}
    for name, src in srcs.items():
        with counting_reads() as counts:
            weights = load_weights(src, Layout(tp=tp, dp=dp), dtype=None, progress=False, provider="zero3")
        reads[name] = dict(counts, own=own_bytes(weights.plan, weights.source_dtypes),
                           pieces=len(weights.plan.tensors))
        save_sharded(weights, dsts[name])
    return reads


def export_resharded(srcs: dict[str, str], outs: dict[str, str], tp: int) -> dict[str, str | None]:
    """Sharded -> tp=3 in the stored dtypes -> HF export; per checkpoint, the error if any.

    Errors are returned, not raised, so that a broken round trip fails its own tests and not the launch's
    others: every rank reads the same manifest, and export agrees on failures collectively.
    """
    errors: dict[str, str | None] = {}
    for name, src in srcs.items():
        try:
            export(load_weights(src, Layout(tp=tp), dtype=None, progress=False), outs[name], max_file_bytes=20_000,
                   progress=False)
            errors[name] = None
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors[name] = f"{type(e).__name__}: {e}"
    return errors


def init_and_export(configs: dict[str, str], outs: dict[str, str], tp: int, pp: int, dp: int, provider: str,
                    seed: int) -> None:
    """Fresh weights under (tp, pp, dp) and ``provider``, exported as an HF checkpoint."""
    for name, config in configs.items():
        weights = init_weights(load_spec(config), Layout(tp, pp, dp), seed, provider=provider, source_dir=config,
                               progress=False)
        export(weights, outs[name], max_file_bytes=20_000, progress=False)


# The update hooks.


def masters(model: Model) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.provider.masters.items()}


def update_round_trip(path: str, tp: int, pp: int, dp: int, offload: bool, ids: torch.Tensor,
                      blocks: tuple[str, ...]) -> dict[str, Any]:
    """Masters through begin_update ... end_update, untouched and then +1 on ``blocks``, and forwards around it.

    The resident model gets the same +1 through its own hooks, as the reference for the forward.
    """
    layout = Layout(tp, pp, dp)
    out: dict[str, Any] = {}
    with load_model(path, layout, provider="zero3", offload=offload, progress=False) as zero3, \
            load_model(path, layout, progress=False) as resident:
        provider = zero3.provider
        blocks = tuple(b for b in blocks if b in zero3.plan.blocks)
        out["flats"] = len(zero3.plan.flats)
        out["before"], out["logits before"] = masters(zero3), zero3(ids)
        provider.begin_update()
        for block in zero3.plan.blocks:
            provider.fetch_master(block)
            provider.release_master(block)
        provider.end_update()
        out["untouched"] = masters(zero3)
        gathers = [provider.stats()["gathers"]]
        out["logits untouched"] = zero3(ids)
        gathers.append(provider.stats()["gathers"])
        zero3(ids)
        gathers.append(provider.stats()["gathers"])
        out["gathers"] = gathers
        for model in (zero3, resident):
            model.provider.begin_update()
            for block in blocks:
                model.provider.fetch_master(block)
                for t in model.provider.master(block).values():
                    t.add_(1)
            if model is zero3:
                out["during"] = masters(zero3)
            for block in blocks:
                model.provider.release_master(block)
            model.provider.end_update()
        out["after"], out["blocks"] = masters(zero3), blocks
        before = provider.stats()["gathers"]
        out["logits after"], out["resident after"] = zero3(ids), resident(ids)
        out["gathers after"] = provider.stats()["gathers"] - before
    return out


def fail_mid_gather(path: str, ids: torch.Tensor) -> dict[str, Any]:
    """ZeRO-3 at dp=2 through shared memory, rank 1's part of the first gather failing as it is filled: each rank's
    error and how long it took to come, and afterwards the slots and counters of rank 1's transfer."""
    with load_model(path, Layout(dp=2), provider="zero3", progress=False) as model:
        provider, transfer = model.provider, model.provider.transfer
        if rank() == 1:
            def broken(*args) -> None:
                raise RuntimeError("injected failure of rank 1's fill")

            transfer.fill = broken
        start = time.monotonic()
        try:
            model(ids)
            error = None
        except RuntimeError as e:
            error = str(e)
        return {"error": error, "seconds": time.monotonic() - start, "transfer": type(transfer).__name__,
                "held": sorted(provider.held), "users": [s.users for s in provider.slots.values()],
                "holding": [s.flat for s in provider.slots.values()], "taken": list(transfer.held),
                "acquired": list(transfer.acquired), "released": transfer.flags[:, 0, transfer.me].tolist()}


def zero3_matches_resident(path: str, layout: Layout, ids: torch.Tensor) -> tuple[bool, str]:
    """Whether ZeRO-3 logits equal resident ones bit for bit, and which transfer carried the gathers."""
    with load_model(path, layout, provider="zero3", work_dtype=torch.bfloat16, dtype=torch.float32,
                    progress=False) as zero3:
        got, transfer = zero3(ids), type(zero3.provider.transfer).__name__
    with load_model(path, layout, dtype=torch.bfloat16, progress=False) as resident:
        want = resident(ids)
    return bool(torch.equal(got, want)), transfer


def logits_by_work_dtype(path: str, dp: int, ids: torch.Tensor, work_dtypes: list) -> list[torch.Tensor]:
    """fp32 masters sharded over ``dp`` ranks, the logits of ``ids`` with each work dtype's gathers (None: fp32)."""
    out = []
    for work_dtype in work_dtypes:
        with load_model(path, Layout(dp=dp), provider="zero3", work_dtype=work_dtype, progress=False) as model:
            out.append(model(ids))
    return out
