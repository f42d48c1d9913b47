"""``shardwise bench zero3``: forward time and memory of DP replicas, ZeRO-3 (bf16, fp8 and int8 gathers) and
torch FSDP2."""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

from ..io.loader import load_model
from ..plan.mesh import Layout
from ..plan.rank import plan_rank
from ..plan.spec import load_spec
from .measure import _MB, _release_freed_memory, _reset_peak, _status_kb, all_ranks, barrier, rss_bytes

# ZeRO-3 against plain data parallelism and torch's FSDP2 (issue: `shardwise bench zero3`).

ZERO3_SETTINGS = ("replicated", "sharded", "sharded_fp8", "sharded_int8", "fsdp2")
_WORK_DTYPES = {"sharded": torch.bfloat16, "sharded_fp8": torch.float8_e4m3fn, "sharded_int8": torch.int8}


def bench_zero3_rank(checkpoint: str, tokens: int = 128, repeats: int = 5, prefetch: int = 1, profile: bool = False,
                     settings: tuple[str, ...] = ZERO3_SETTINGS) -> list[dict]:
    """Forward time and memory of one 1 x ``tokens`` batch under DP replicas, ZeRO-3 and FSDP2; runs on every rank.

    The world is the DP group (tp = pp = 1); every rank feeds the same seeded ids. Per
    setting: load, one warm-up forward, then ``repeats`` forwards each after a barrier;
    a setting's time is the largest of the ranks' medians. Returns (on rank 0) one dict
    per setting and a last ``{"setting": "summary", ...}`` with the headline figures:
    ``replicated_s``, ``sharded_s``, ``sharded_fp8_s``, ``sharded_int8_s``, ``fsdp2_s``,
    ``gather_bytes_bf16``, ``gather_bytes_fp8``, ``peak_rss_mb``, ``plan_bytes``, ``allocated_bytes``.
    ``profile`` adds a per-block breakdown of the ZeRO-3 forwards and a raw gather probe.
    """
    unknown = [s for s in settings if s not in ZERO3_SETTINGS]
    if unknown or tokens < 1 or repeats < 1:
        raise ValueError(f"settings must come from {ZERO3_SETTINGS} (got {unknown}), tokens and repeats >= 1")
    world = dist.get_world_size() if dist.is_initialized() else 1
    spec = load_spec(checkpoint)
    ids = torch.randint(0, spec.vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    lines = []
    for setting in settings:
        lines.append(_zero3_setting(checkpoint, setting, ids, world, repeats, prefetch, profile))
    if profile and world > 1 and any(s in _WORK_DTYPES for s in settings):
        layer = next(f for name, f in plan_rank(spec, Layout(dp=world), 0, "zero3").flats.items()
                     if name.layer is not None)
        lines.append({"setting": "gather_probe",
                      **_gather_probe(layer.parts * layer.chunk * torch.bfloat16.itemsize, tokens, spec.hidden,
                                      repeats)})
    return lines + [_zero3_summary(lines, tokens, repeats, prefetch, world)]


def _zero3_summary(lines: list[dict], tokens: int, repeats: int, prefetch: int, world: int) -> dict:
    by = {line["setting"]: line for line in lines}
    out: dict = {"setting": "summary", "tokens": tokens, "repeats": repeats, "prefetch": prefetch, "world": world}
    for name in ZERO3_SETTINGS:
        if name in by:
            out[f"{name}_s"] = by[name]["s"]
    if "fsdp2_error" in by.get("fsdp2", {}):
        out["fsdp2_error"] = by["fsdp2"]["fsdp2_error"]
    for key, name in (("bf16", "sharded"), ("fp8", "sharded_fp8"), ("int8", "sharded_int8")):
        if name in by:
            out[f"gather_bytes_{key}"] = by[name]["gather_bytes"]
    out["peak_rss_mb"] = {name: line["peak_rss_mb"] for name, line in by.items() if "peak_rss_mb" in line}
    out["plan_bytes"] = {name: line["plan_bytes"] for name, line in by.items() if "plan_bytes" in line}
    out["allocated_bytes"] = {name: line["allocated_bytes"] for name, line in by.items() if "allocated_bytes" in line}
    s = {k: v for k, v in out.items() if k.endswith("_s") and isinstance(v, float)}
    if "sharded_s" in s and "replicated_s" in s:
        out["sharded_over_replicated"] = s["sharded_s"] / s["replicated_s"]
    if "sharded_s" in s and "fsdp2_s" in s:
        out["sharded_over_fsdp2"] = s["sharded_s"] / s["fsdp2_s"]
    if "gather_bytes_bf16" in out and "gather_bytes_fp8" in out and out["gather_bytes_bf16"]:
        out["fp8_over_bf16_bytes"] = out["gather_bytes_fp8"] / out["gather_bytes_bf16"]
    return out


def _zero3_setting(checkpoint: str, setting: str, ids: torch.Tensor, world: int, repeats: int, prefetch: int,
                   profile: bool) -> dict:
    """One setting's line: load, warm up, time, and (for ZeRO-3) count gathered bytes and check the memory plan.

    ``s`` is the largest of the ranks' median wall times; ``cpu_s`` the same for CPU time
    (the rank process's, all threads, gloo's included). On a machine other jobs share,
    CPU time stays near what an idle machine's wall time would be (less any time spent
    blocked), and ``load_avg_1m``, sampled before the timed forwards, flags the sharing.

    Memory: before loading, garbage is collected and freed heap trimmed, then the
    kernel's high-water mark is reset. ``peak_rss_mb`` is the setting's high-water mark,
    the process's baseline (Python, torch) included; ``rss_growth_mb`` is that mark minus
    RSS at the start: what loading and running the setting added. Its phases, each a
    high-water mark over RSS at the phase's start: ``load_peak_rss_mb`` (building the
    model), ``warmup_peak_rss_mb`` (the first forward) and ``forward_peak_rss_mb`` (the
    timed forwards).
    """
    from ..providers.zero3 import memory_plan

    _release_freed_memory()
    rss_start = rss_bytes()
    _reset_peak()
    line: dict = {"setting": setting}
    zero3 = setting in _WORK_DTYPES
    model, error = None, None
    try:
        if setting == "fsdp2":
            model = _fsdp2_model(checkpoint, world, prefetch)
        elif zero3:
            model = load_model(checkpoint, Layout(dp=world), dtype=torch.float32, provider="zero3",
                               work_dtype=_WORK_DTYPES[setting], prefetch=prefetch, progress=False)
        else:
            model = load_model(checkpoint, Layout(dp=world), dtype=torch.bfloat16, progress=False)
        load_peak, rss_loaded = _status_kb("VmHWM") * 1024, rss_bytes()
        _reset_peak()
        before = model.provider.stats() if zero3 else None
        _zero3_forward(model, ids, setting)  # warm-up: first allocations, FSDP2's lazy init, the cold gathers
    except Exception as e:  # noqa: BLE001 - FSDP2 failing on CPU is itself the result; anything else is re-raised
        if setting != "fsdp2":
            raise
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    # A rank that failed to build FSDP2 must not leave its peer alone in a collective: agree first.
    errors = [e for e in all_ranks(error) if e]
    if errors:
        line |= {"s": None, "fsdp2_s": None, "fsdp2_error": errors[0]}
        del model
        _release_freed_memory()
        return line
    warmup_peak = _status_kb("VmHWM") * 1024
    if zero3:
        # Cold: every block is gathered; afterwards the embedding and head come from the version cache.
        line["first_gather_bytes"] = model.provider.stats()["bytes"] - before["bytes"]
        plan = memory_plan(model.plan, torch.float32, _WORK_DTYPES[setting], prefetch, False,
                           shared=model.provider.transfer.in_place)
        line["plan_bytes"] = all_ranks(sum(plan.values()))
        line["allocated_bytes"] = all_ranks(sum(model.provider.nbytes().values()))
        line["plan"], line["allocated"] = plan, model.provider.nbytes()
        line["transfer"] = type(model.provider.transfer).__name__
    rss_warm = rss_bytes()
    _reset_peak()
    times, cpu, deltas = [], [], []
    load = os.getloadavg()[0]
    for _ in range(repeats):
        barrier()
        before = model.provider.stats() if zero3 else None
        t0, c0 = time.perf_counter(), time.process_time()
        _zero3_forward(model, ids, setting)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if zero3:
            after = model.provider.stats()
            deltas.append({k: after[k] - before[k] for k in after})
    forward_peak = _status_kb("VmHWM") * 1024
    peak = max(load_peak, warmup_peak, forward_peak)
    medians = all_ranks(statistics.median(times))
    cpu_medians = all_ranks(statistics.median(cpu))
    line |= {"s": max(medians), "rank_s": medians, "cpu_s": max(cpu_medians), "rank_cpu_s": cpu_medians,
             "load_avg_1m": max(all_ranks(round(load, 2))),
             "peak_rss_mb": all_ranks(round(peak / _MB, 1)),
             "rss_growth_mb": all_ranks(round((peak - rss_start) / _MB, 1)),
             "load_peak_rss_mb": all_ranks(round((load_peak - rss_start) / _MB, 1)),
             "warmup_peak_rss_mb": all_ranks(round((warmup_peak - rss_loaded) / _MB, 1)),
             "forward_peak_rss_mb": all_ranks(round((forward_peak - rss_warm) / _MB, 1))}
    if zero3:
        # Bytes landing in this rank's gather buffers per steady-state forward (its own chunk included).
        line["gather_bytes"] = max(d["bytes"] for d in deltas)
        line["gathers"] = max(d["gathers"] for d in deltas)
        line["hits"] = min(d["hits"] for d in deltas)
        if profile:
            line["profile"] = all_ranks(_profile_zero3(model, ids, repeats))
    if setting == "fsdp2":
        line["fsdp2_s"] = line["s"]
    else:
        model.close()
    del model
    _release_freed_memory()
    return line


def _zero3_forward(model, ids: torch.Tensor, setting: str) -> None:
    if setting == "fsdp2":
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    else:
        model(ids)


def _fsdp2_model(checkpoint: str, world: int, prefetch: int):
    """HF's model of the checkpoint (fp32 params) under FSDP2 on a CPU mesh: each decoder layer, then the root.

    Parameters gather in bf16 (``MixedPrecisionPolicy``), as ZeRO-3 gathers bf16 from
    fp32 masters; each layer prefetches the next ``prefetch`` in the forward, as
    shardwise's stream does (without it, FSDP2 on CPU issues each gather only when the
    layer starts).
    """
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    layers = list(model.model.layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if prefetch:
        for i, layer in enumerate(layers):
            if layers[i + 1 : i + 1 + prefetch]:
                layer.set_modules_to_forward_prefetch(layers[i + 1 : i + 1 + prefetch])
    return model


class _BlockProfile:
    """Per-block seconds of a ZeRO-3 forward, by wrapping one provider's methods on the instance (bench only).

    - ``cast``: turning the master chunk into wire bytes (cast, or quantize with its scales);
    - ``issue``: starting the gather (gloo: issuing the all-gather; shared memory: copying in, raising the flag);
    - ``wait``: blocked in ``get`` until every rank's chunk has arrived;
    - ``reuse_wait``: blocked in ``gather`` until the slot's previous contents are free to overwrite;
    - ``dequantize``: quantized wire bytes back into fp32 work tensors;
    - ``compute``: from ``get`` returning the tensors to the block's ``release``.

    Times are exclusive: a wrapped call inside another (gloo's ``claim`` waits through
    ``wait``) counts once, under the inner one. Only the methods a provider has are
    wrapped, so this follows the gloo and the shared-memory transfers alike.
    """

    KEYS = ("cast", "issue", "wait", "reuse_wait", "dequantize", "compute")

    def __init__(self, provider) -> None:
        self.times: dict[str, dict[str, float]] = {}
        self.block: str | None = None
        self.phase = "start"
        self.got: dict[str, float] = {}
        self.stack: list[float] = []  # time spent in nested wrapped calls, per open call
        self.wrapped: list[tuple[object, str]] = []
        transfer = provider.transfer
        self._wrap(provider, "_start", self._phase("start"))
        self._wrap(provider, "_wait", self._phase("wait"))
        self._wrap(provider, "get", self._get)
        self._wrap(provider, "release", self._release)
        self._wrap(provider, "_outgoing", self._timed(lambda: "cast"))
        waiting = self._timed(lambda: "wait" if self.phase == "wait" else "reuse_wait")
        self._wrap(transfer, "claim", self._timed(lambda: "reuse_wait"))
        self._wrap(transfer, "fill", self._timed(lambda: "issue"))
        self._wrap(transfer, "wait", waiting)
        for quantizer in provider.quantizers.values():
            self._wrap(quantizer, "dequantize", self._timed(lambda: "dequantize"))

    def _wrap(self, obj, name: str, make) -> None:
        original = getattr(obj, name, None)
        if original is not None:
            setattr(obj, name, make(original))
            self.wrapped.append((obj, name))

    def restore(self) -> None:
        for obj, name in self.wrapped:
            obj.__dict__.pop(name, None)

    def add(self, key: str, seconds: float) -> None:
        row = self.times.setdefault(self.block, dict.fromkeys(self.KEYS, 0.0))
        row[key] += seconds

    def _timed(self, key):
        def make(original):
            def timed(*args, **kwargs):
                self.stack.append(0.0)
                t0 = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    elapsed = time.perf_counter() - t0
                    self.add(key(), elapsed - self.stack.pop())
                    if self.stack:
                        self.stack[-1] += elapsed
            return timed
        return make

    def _phase(self, phase: str):
        def make(original):
            def call(block):
                self.block, self.phase = block, phase
                return original(block)
            return call
        return make

    def _get(self, original):
        def get(block):
            out = original(block)
            self.got[block] = time.perf_counter()
            return out
        return get

    def _release(self, original):
        def release(block):
            if block in self.got:
                self.block = block
                self.add("compute", time.perf_counter() - self.got.pop(block))
            return original(block)
        return release


def _profile_zero3(model, ids: torch.Tensor, repeats: int) -> dict:
    """Mean seconds per forward by phase and by block, from ``repeats`` forwards run after the timed ones."""
    prof = _BlockProfile(model.provider)
    total = 0.0
    try:
        for _ in range(repeats):
            barrier()
            t0 = time.perf_counter()
            model(ids)
            total += time.perf_counter() - t0
    finally:
        prof.restore()
    blocks = {b: {k: v / repeats for k, v in row.items()} for b, row in prof.times.items()}
    phases = {k: sum(row[k] for row in blocks.values()) for k in _BlockProfile.KEYS}
    forward_s = total / repeats
    return {"forward_s": forward_s, **phases, "other": forward_s - sum(phases.values()),
            "blocks": {b: {k: round(v, 6) for k, v in row.items()} for b, row in blocks.items()}}


def _gather_probe(nbytes: int, tokens: int, hidden: int, repeats: int) -> dict:
    """What one ZeRO-3 layer gather of ``nbytes`` costs here, apart from the model.

    - ``all_gather_s``: gloo's ``all_gather_single`` of the block, each rank sending ``nbytes / world``;
    - ``memcpy_s``: one copy of ``nbytes`` in this process, what a shared-memory gather would at least pay;
    - ``compute_s``: bf16 matmuls of a layer's size (tokens x hidden against a block's weights), alone;
    - ``overlapped_s``: the same matmuls with the gather issued first and waited for after them;
      ``overlap`` = (gather + compute - overlapped) / min(gather, compute): 1 is full overlap, 0 none.
    """
    world = dist.get_world_size()
    chunk = torch.ones(-(-nbytes // world), dtype=torch.uint8)
    out = torch.empty(chunk.numel() * world, dtype=torch.uint8)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    w = torch.randn(nbytes // 2 // hidden, hidden, dtype=torch.bfloat16)

    def gather() -> None:
        dist.all_gather_single(out, chunk)

    def compute() -> None:
        torch.nn.functional.linear(x, w)

    def both() -> None:
        work = dist.all_gather_single(out, chunk, async_op=True)
        compute()
        work.wait()

    def median(fn) -> float:
        fn()
        times = []
        for _ in range(max(repeats, 5)):
            barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return max(all_ranks(statistics.median(times)))

    copy_src = out.clone()
    result = {"bytes": out.numel(), "all_gather_s": median(gather), "memcpy_s": median(lambda: out.copy_(copy_src)),
              "barrier_s": median(barrier), "compute_s": median(compute), "overlapped_s": median(both)}
    hidden_time = result["all_gather_s"] + result["compute_s"] - result["overlapped_s"]
    result["overlap"] = hidden_time / min(result["all_gather_s"], result["compute_s"])
    return result
