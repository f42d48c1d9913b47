"""What the series tests run inside spawned ranks: one launch per world size runs every job of that size.

Jobs take series declarations as text (``"*.o,k=1"``) and return plain values, which
``run_jobs`` gathers from every rank. A job that raises returns its traceback instead,
so one broken check fails its own tests rather than every test of its world size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import zero3_workers as zw
from shared_launch import everyone

import shardwise.io.reader as reader
from shardwise import Layout, Model, ProviderError, RankPlan, export, load_model, load_weights, save_sharded
from shardwise.io.sharded import stored_name
from shardwise.plan.boxes import first_holders
from shardwise.plan.series import Series


def parse(declared: tuple[str, ...]) -> tuple[Series, ...]:
    return tuple(Series.parse(text) for text in declared)


@contextlib.contextmanager
def shared_memory(on: bool) -> Iterator[None]:
    """SHARDWISE_SHM as this rank's loads see it: off makes the DP group broadcast through gloo."""
    old = os.environ.get("SHARDWISE_SHM")
    os.environ["SHARDWISE_SHM"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SHARDWISE_SHM")
        else:
            os.environ["SHARDWISE_SHM"] = old


# Reading.


@contextlib.contextmanager
def reading() -> Iterator[dict[str, Any]]:
    """zero3_workers' counts of bytes read, plus ``sources``: the names of the checkpoint tensors read from."""
    with zw.counting_reads() as counts:
        counts["sources"] = set()
        pread, mapped = reader._pread_into, reader.mapped_box

        def named_pread(fd: int, buf, offset: int, entry: reader.Entry) -> None:
            counts["sources"].add(entry.name)
            pread(fd, buf, offset, entry)

        def named_mapped(entry: reader.Entry, box, write: bool):
            counts["sources"].add(entry.name)
            return mapped(entry, box, write)

        reader._pread_into, reader.mapped_box = named_pread, named_mapped
        try:
            yield counts
        finally:
            reader._pread_into, reader.mapped_box = pread, mapped


def region_bytes(plan: RankPlan, dtypes: dict[str, torch.dtype]) -> int:
    """Bytes of the distinct checkpoint regions a rank holds, in the checkpoint's dtypes: what its load must read
    (a tied LM head is its embedding's bytes, read once)."""
    held = ((None, box) for t in plan.tensors.values() for box in t.boxes)
    return sum(box.numel * dtypes[box.source].itemsize for _, box in first_holders(held))


def read_report(counts: dict[str, Any], model: Model) -> dict[str, Any]:
    return dict(counts, sources=sorted(counts["sources"]), own=region_bytes(model.plan, model.weights.source_dtypes))


# Same output, memory and reads.


def resident_facts(model: Model) -> dict[str, Any]:
    """What a resident rank holds, as the reference for a series rank: tensor names, their bytes as loaded and in
    the checkpoint's dtypes, and the checkpoint tensors each is read from."""
    dtypes = model.weights.source_dtypes
    return {"resident tensors": sorted(model.weights.tensors),
            "resident masters": model.provider.nbytes()["masters"],
            "sizes": {name: t.nbytes for name, t in model.weights.tensors.items()},
            "source sizes": {name: sum(b.numel * dtypes[b.source].itemsize for b in t.boxes)
                             for name, t in model.plan.tensors.items()},
            "hf sources": {name: sorted({b.source for b in t.boxes}) for name, t in model.plan.tensors.items()}}


def compare(path: str, layout: Layout, declared: tuple[str, ...], ids: torch.Tensor, steps: int,
            dtype: torch.dtype = torch.float32, shm: bool = True) -> dict[str, Any]:
    """Resident weights and the declared series under one layout, on this replica's own ids: their logits and
    tokens, and what each load read, held and allocated."""
    with shared_memory(shm):
        with reading() as counts:
            resident = load_model(path, layout, dtype=dtype, progress=False)
        with resident:
            ids = zw.replica_ids(ids, layout, resident.spec.vocab)
            out: dict[str, Any] = {"ids": ids, "resident": zw.outputs(resident, ids, steps),
                                   "resident reads": read_report(counts, resident), **resident_facts(resident)}
        with reading() as counts:
            model = load_model(path, layout, dtype=dtype, progress=False, provider="series", series=parse(declared))
        with model:
            out["series"] = zw.outputs(model, ids, steps)
            out["reads"] = read_report(counts, model)
            out["tensors"] = sorted(model.weights.tensors)
            out["measured"] = model.provider.series_nbytes()
            out["nbytes"] = model.provider.nbytes()
            provider = model.provider
            out["transfer"] = type(getattr(provider, "transfer", provider)).__name__
            out["owner reads the segment"] = all(  # on one host an owner computes from the copy every rank reads
                provider.tensors[n].data_ptr() == layer.data_ptr()
                for n, layer in getattr(provider, "layers", {}).items() if n in provider.tensors)
    return out


# The ring.


def trace_broadcasts(model: Model) -> None:
    """Record every broadcast in ``provider.trace`` as ``("broadcast", "<tensor> from <DP rank>")``, beside the
    gather/get/release calls, naming the layer by the window it was started into."""
    provider = model.provider
    send = provider.transfer.broadcast

    def traced(slot: int, source: int, tensor: torch.Tensor | None, nbytes: int) -> None:
        ring = next(r for r in provider.rings if r.first <= slot < r.first + r.plan.windows)
        name = ring.plan.names[ring.holding[slot - ring.first]]
        if provider.trace is not None:
            provider.trace.append(("broadcast", f"{name} from {source}"))
        send(slot, source, tensor, nbytes)

    provider.transfer.broadcast = traced


def ring(path: str, layout: Layout, declared: tuple[str, ...], ids: torch.Tensor, shm: bool = True) -> dict[str, Any]:
    """Every provider call and broadcast of a cold forward, a warm one, and one after ``invalidate()``, with the
    provider's stats before and after each, and its series' bytes."""
    with shared_memory(shm), load_model(path, layout, progress=False, provider="series",
                                        series=parse(declared)) as model:
        provider = model.provider
        ids = zw.replica_ids(ids, layout, model.spec.vocab)
        trace_broadcasts(model)
        out: dict[str, Any] = {"measured": provider.series_nbytes(), "stats": [provider.stats()], "traces": []}
        for step in ("cold", "warm", "invalidated"):
            if step == "invalidated":
                provider.invalidate()
            provider.trace = []
            model(ids)
            out["traces"].append(provider.trace)
            out["stats"].append(provider.stats())
    return out


def gather_after_close(model: Model) -> None:
    provider = model.provider
    model.close()
    provider.gather("layers.1")


MISUSES: dict[str, Callable[[Model], Any]] = {  # with "*.o,k=0" first: one window for o
    "get without gather": lambda m: m.provider.get("layers.1"),
    "gather twice": lambda m: [m.provider.gather("layers.1"), m.provider.gather("layers.1")],
    "release never gathered": lambda m: m.provider.release("layers.2"),
    "no free window": lambda m: [m.provider.gather("layers.0"), m.provider.gather("layers.1")],
    "unknown block": lambda m: m.provider.gather("layers.9"),
    "gather after close": gather_after_close,
}


def misuses(path: str, layout: Layout, declared: tuple[str, ...], shm: bool) -> dict[str, str | None]:
    """Each misuse on a freshly loaded series model: the ProviderError it raised, or None. Every DP rank makes the
    same calls, so a broadcast a misuse starts has its peers."""
    out = {}
    for name, misuse in MISUSES.items():
        with shared_memory(shm), load_model(path, layout, progress=False, provider="series",
                                            series=parse(declared)) as model:
            try:
                misuse(model)
                out[name] = None
            except ProviderError as e:
                out[name] = str(e)
    return out


def update(path: str, layout: Layout, declared: tuple[str, ...], ids: torch.Tensor, block: str, shm: bool
           ) -> dict[str, Any]:
    """+1 on every master the update hooks hand out for ``block``, on resident and on series weights: which masters
    the series hands out here, and the forwards (and broadcasts) before and after."""
    with shared_memory(shm), load_model(path, layout, progress=False) as resident, \
            load_model(path, layout, progress=False, provider="series", series=parse(declared)) as model:
        ids = zw.replica_ids(ids, layout, model.spec.vocab)
        out: dict[str, Any] = {"before": model(ids), "held": sorted(model.weights.tensors)}
        for m in (resident, model):
            m.provider.begin_update()
            m.provider.fetch_master(block)
            masters = m.provider.master(block)
            if m is model:
                out["handed"] = sorted(masters)
            for t in masters.values():
                t.add_(1)
            m.provider.release_master(block)
            m.provider.end_update()
        gathers = model.provider.stats()["gathers"]
        out["after"], out["resident after"] = model(ids), resident(ids)
        out["gathers after"] = model.provider.stats()["gathers"] - gathers
    return out


def eos_lockstep(paths: dict[str, str], ids: torch.Tensor, steps: int, declared: tuple[str, ...]) -> dict[str, Any]:
    """zero3_workers.eos_lockstep under a series: replica 0 reaches EOS first; broadcasting, it keeps going with
    replica 1 until both are done, each with the tokens it generates alone on resident weights; sharing the layers
    on one host, it simply stops."""
    layout = Layout(dp=2)
    mine, prompt = ids[zw.rank() : zw.rank() + 1], ids.shape[1]
    for name, path in paths.items():
        with load_model(path, layout, progress=False) as resident:
            first, second = (t[0, prompt:].tolist() for t in everyone(resident.generate(mine, steps)))
            eos = next((t for t in first[:-1] if t not in second), None)
            if eos is None:
                continue
            alone = resident.generate(mine, steps, eos_token_id=eos)
        out = {"checkpoint": name, "eos": eos, "alone": alone}
        for key, shm in (("together", False), ("shared", True)):
            with shared_memory(shm), load_model(path, layout, progress=False, provider="series",
                                                series=parse(declared)) as model:
                out[key] = model.generate(mine, steps, eos_token_id=eos)
        return out
    return {"checkpoint": None}


# Export and sharded saves.


def round_trip(src: str, layout: Layout, declared: tuple[str, ...], dirs: dict[str, str], other: Layout,
               ids: torch.Tensor) -> dict[str, Any]:
    """HF -> series weights in the checkpoint's dtypes -> ``export`` (to ``dirs["direct"]``) and ``save_sharded``
    (``dirs["sharded"]``) -> loaded under ``other`` -> ``export`` (``dirs["resharded"]``); then whether the sharded
    checkpoint, loaded back under its own series, computes what the HF one does."""
    series = parse(declared)
    weights = load_weights(src, layout, dtype=None, progress=False, provider="series", series=series)
    export(weights, dirs["direct"], max_file_bytes=20_000, progress=False)
    save_sharded(weights, dirs["sharded"])
    export(load_weights(dirs["sharded"], other, dtype=None, progress=False), dirs["resharded"],
           max_file_bytes=20_000, progress=False)
    with load_model(dirs["sharded"], layout, progress=False, provider="series", series=series) as back, \
            load_model(src, layout, progress=False, provider="series", series=series) as hf:
        ids = zw.replica_ids(ids, layout, hf.spec.vocab)
        same = bool(torch.equal(back(ids), hf(ids)))
    plan = weights.plan
    return {"owned": sorted(stored_name(box) for _, box in plan.owned()), "same logits": same,
            "sources": {name: sorted({box.source for box in t.boxes}) for name, t in plan.work.items()}}
