"""What each rank of a layout owns of a model: ``plan_rank`` and the ``RankPlan`` it returns.

``plan_rank`` turns a spec plus a rank into the box lists of every tensor the rank computes with
(``work``), the blocks a provider hands them out in, and what the rank holds: the
work tensors themselves, under ZeRO-3 its chunk of each flat block, and under a layer-sharded
series (``series``) the work tensors less the series layers other DP ranks own. Everything
downstream (reader, providers, runtime, export) works from that plan and never
re-derives a split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..words import plural
from . import owners
from .archs import Kind
from .boxes import Box, ShardedTensor, split_evenly
from .flat import Buffer, FlatBlock, View, pack
from .mesh import Heads, Layout, LayoutError, head_split
from .names import EMBED, HEAD, Block, TensorName
from .series import Series, SeriesError, SeriesPlan, plan_series
from .spec import ModelSpec
from .tp import resolve

PROVIDERS = ("resident", "zero3", "series")


@dataclass(frozen=True)
class RankPlan:
    """Everything one rank computes with and holds, as box lists keyed by local tensor name.

    ``styles`` is the TP style each tensor kind runs with (``tp.resolve``); ``heads``, ``ffn``
    and ``vocab`` are the rank's share where they are split, else the whole; ``experts`` the
    routed experts it holds, in the order it stacks them (all without EP; none in a dense model).
    ``work`` are the TP-local tensors the model computes with, handed out per block
    (``blocks``: "embed", "layers.N", "head"); ``alias`` maps a tensor that is another
    one on this rank (a tied LM head beside its embedding) to it. ``tensors`` is what
    the rank holds, loads and saves, laid out in ``buffers``: the work tensors under
    the resident provider, its chunk of each flat block (``flats``) under ZeRO-3, and
    under the series provider the work tensors except the series layers (``series``)
    that other DP ranks own. ``declared`` are the series declarations the plan came from.
    """

    spec: ModelSpec
    layout: Layout
    rank: int
    provider: str
    layers: range
    heads: Heads
    ffn: tuple[int, int]
    vocab: tuple[int, int]
    experts: range
    styles: dict[str, str]
    work: dict[str, ShardedTensor]
    blocks: dict[str, tuple[str, ...]]
    alias: dict[str, str]
    flats: dict[str, FlatBlock]
    tensors: dict[str, ShardedTensor]
    buffers: tuple[Buffer, ...]
    series: tuple[SeriesPlan, ...] = ()
    declared: tuple[Series, ...] = ()

    @property
    def stage(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.layout.pp - 1

    def batch_rows(self, batch: int) -> range:
        """The rows of a (batch, seq) input this rank computes (see ``batch_shares``)."""
        return batch_shares(batch, self.layout)[self.layout.ep_rank(self.rank)]

    def tp_peers(self) -> list[RankPlan]:
        """The plans of this rank's TP group (this one included), in TP order."""
        stage, dp_rank, ep_rank, _ = self.layout.position(self.rank)
        return [self.peer(self.layout.rank_of(stage, dp_rank, ep_rank, t)) for t in range(self.layout.tp)]

    def peer(self, rank: int) -> RankPlan:
        """Another rank's plan under the same layout, provider and series."""
        return plan_rank(self.spec, self.layout, rank, self.provider, self.declared)

    def owned(self) -> list[tuple[str, Box]]:
        """This rank's (held tensor, box) pairs covering the elements it owns: every element has one owner.

        The owner of an element is the lowest rank that holds it. Ownership is decided per
        element, not per box: ZeRO-3 cuts each TP rank's flat block at its own chunk edges, so a
        KV head replicated over TP ranks sits in boxes that overlap without being equal, and
        a tied embedding sits on the first and the last stage. Each held box less what a lower
        rank (or this rank, earlier) holds is what this rank owns, found from mesh coordinates
        (``owners``). Export writes each byte once through it, a sharded save stores each element
        once, and a global gradient norm counts each element once.
        """
        return owners.owned(self)

    @functools.cached_property
    def by_source(self) -> dict[str, list[tuple[str, Box]]]:
        """The boxes of the work tensors, by checkpoint tensor; an alias's are its target's and are left out."""
        out: dict[str, list[tuple[str, Box]]] = {}
        for name, t in self.work.items():
            if name not in self.alias:
                for box in t.boxes:
                    out.setdefault(box.source, []).append((name, box))
        return out

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes this rank holds, counting tensors that share a buffer (tied embeddings) once."""
        return sum(b.numel for b in self.buffers) * dtype.itemsize


def local_tensor(spec: ModelSpec, kind: Kind, name: str, n: int, ranges: dict[str, tuple[int, int]],
                 style: str) -> ShardedTensor:
    """``kind``'s local tensor in layer ``n`` on a rank whose share of each split size is ``ranges``.

    The parts are stacked along dim 0 (dim 1 for a kind whose built-in style is rowwise: its
    unit runs along the columns), each cut to the rank's range of its unit when the plan
    splits the kind (its ``style`` is not replicated), else whole.
    """
    axis = 1 if kind.style == "rowwise" else 0
    split = style != "replicated"
    boxes, at, other = [], 0, None
    for part in kind.parts:
        shape = tuple(spec.size(s) for s in part.shape)
        base = sum(spec.size(s) for s in part.at)
        lo, hi = ranges[part.unit] if split and part.unit else (0, spec.size(part.unit) if part.unit else shape[axis])
        start = tuple(base + lo if d == axis else 0 for d in range(len(shape)))
        stop = tuple(base + hi if d == axis else n_d for d, n_d in enumerate(shape))
        offset = tuple(at if d == axis else 0 for d in range(len(shape)))
        boxes.append(Box(spec.source_of(part, n), start, stop, offset))
        at += hi - lo
        other = tuple(n_d for d, n_d in enumerate(shape) if d != axis)
    local = (*other[:axis], at, *other[axis:])
    return ShardedTensor(name, local, tuple(boxes))


def expert_tensor(spec: ModelSpec, kind: Kind, name: str, n: int, experts: range) -> ShardedTensor:
    """A routed expert kind's local tensor in layer ``n``: the rank's experts in order, each whole, each its parts in
    turn, stacked along dim 0 (an (experts, rows, cols) tensor read as 2-D)."""
    boxes, at = [], 0
    for e in experts:
        for part in kind.parts:
            shape = tuple(spec.size(s) for s in part.shape)
            boxes.append(Box(spec.source_of(part, n, e), (0, 0), shape, (at, 0)))
            at += shape[0]
    return ShardedTensor(name, (at, spec.size(kind.parts[0].shape[1])), tuple(boxes))


def _block_tensors(spec: ModelSpec, kinds: tuple[Kind, ...], block: Block, ranges: dict[str, tuple[int, int]],
                   experts: range, styles: dict[str, str]) -> dict[TensorName, ShardedTensor]:
    """The local tensors of one block (the embedding, a decoder layer, the head), in table order."""
    out = {}
    for kind in kinds:
        if spec.holds(kind, block.layer):
            name = TensorName(block, kind.local)
            n = block.layer or 0
            out[name] = (expert_tensor(spec, kind, name, n, experts) if kind.expert else
                         local_tensor(spec, kind, name, n, ranges, styles[kind.local]))
    return out


def plan_rank(spec: ModelSpec, layout: Layout, rank: int, provider: str = "resident",
              series: tuple[Series, ...] = ()) -> RankPlan:
    """The box lists of every tensor ``rank`` computes with and holds under ``layout`` and ``provider``.

    ``series`` declares the layer-sharded series of the ``"series"`` provider, which needs at least one.
    Plans are cached (they are immutable): ownership and the reductions consult every peer's plan.
    """
    return _plan_rank(spec, layout, rank, provider, tuple(series))


def forget_plans() -> None:
    """Empty the plan cache: a benchmark times planning from nothing."""
    _plan_rank.cache_clear()


@functools.lru_cache(maxsize=4096)
def _plan_rank(spec: ModelSpec, layout: Layout, rank: int, provider: str, series: tuple[Series, ...]) -> RankPlan:
    if provider not in PROVIDERS:
        raise LayoutError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    if (provider == "series") != bool(series):
        raise SeriesError("the series provider needs at least one series declaration (e.g. '*.o')" if not series
                          else f"series declarations need provider='series', not {provider!r}")
    if not 0 <= rank < layout.world_size:
        raise LayoutError(f"rank {rank} is outside the {layout.world_size}-rank layout {layout}")
    if layout.pp > spec.layers:
        raise LayoutError(f"pp={layout.pp} exceeds the {plural(spec.layers, 'layer')}: some stage would own no layer")
    styles = resolve(spec, layout.tp_plan)
    if layout.sp:
        _check_sequence_parallel(spec, styles)
    stage, dp_rank, tp_rank = layout.coords(rank)
    heads, ffn, vocab = _tp_share(spec, layout.tp, tp_rank, styles)
    lo, hi = split_evenly(spec.layers, layout.pp)[stage]
    layers = range(lo, hi)

    arch = spec.table
    d = spec.head_dim
    experts = expert_shares(spec, layout)[layout.ep_rank(rank)]
    ranges = {"q": (heads.q[0] * d, heads.q[1] * d), "kv": (heads.kv[0] * d, heads.kv[1] * d), "ffn": ffn,
              "vocab": vocab}
    work: dict[str, ShardedTensor] = {}
    blocks: dict[Block, tuple[TensorName, ...]] = {}
    mine = ([(EMBED, arch.embed)] if stage == 0 else []) + [(Block.of_layer(n), arch.layer) for n in layers] + (
        [(HEAD, arch.head)] if stage == layout.pp - 1 else [])
    for block, kinds in mine:
        tensors = _block_tensors(spec, kinds, block, ranges, experts, styles)
        work.update(tensors)
        blocks[block] = tuple(tensors)
    alias = _shared_storage(work)
    parts = layout.dp if provider == "zero3" else 1
    flats = {b: pack(b, [work[n] for n in names if n not in alias], parts) for b, names in blocks.items()}
    in_series = plan_series(series, work, layers, spec.layers, layout.dp)
    if provider == "zero3":
        held = [flat.master_buffer(dp_rank, work) for flat in flats.values()]
        buffers = tuple(buffer for buffer, _ in held)
        tensors = {name: piece for _, pieces in held for name, piece in pieces.items()}
    else:
        elsewhere = {name for s in in_series for name in s.names if name not in s.owned(dp_rank)}
        tensors = {name: t for name, t in work.items() if name not in elsewhere}
        buffers = _resident_buffers(tensors, alias)
    return RankPlan(spec, layout, rank, provider, layers, heads, ffn, vocab, experts, styles, work, blocks, alias,
                    flats, tensors, buffers, in_series, tuple(series))


# Sequence parallelism all-gathers the tokens where attention and the MLP enter colwise and reduce-scatters them
# where they leave rowwise; the head gathers them after the final norm, and its weight must not be one a replicated
# tied embedding also applies to each rank's own tokens.
SP_STYLES = {"qkv": ("colwise",), "gate_up": ("colwise",), "o": ("rowwise",), "down": ("rowwise",),
             "lm_head": ("colwise", "colwise_gather_output")}


def _check_sequence_parallel(spec: ModelSpec, styles: dict[str, str]) -> None:
    if spec.sparse:
        raise LayoutError(f"sequence parallelism is not supported for a mixture of experts ({spec.arch})")
    wrong = [f"{kind} is {styles[kind]}" for kind, allowed in SP_STYLES.items() if styles[kind] not in allowed]
    if wrong:
        raise LayoutError(f"sequence parallelism needs qkv and gate_up colwise, o and down rowwise and lm_head split; "
                          f"this TP plan has {', '.join(wrong)}")


def _tp_share(spec: ModelSpec, tp: int, tp_rank: int, styles: dict[str, str]
              ) -> tuple[Heads, tuple[int, int], tuple[int, int]]:
    """The rank's attention heads, ffn range and vocab range: its TP share where the plan splits them, else all.

    A split needs at least one unit per rank (uneven splits are fine); a replicated block needs nothing.
    """
    shares = {}
    for unit, kinds, what, size in (("vocab", ("embed", "lm_head"), "vocab", spec.vocab),
                                    ("ffn", ("gate_up",), "intermediate size", spec.intermediate)):
        shares[unit] = (0, size)
        if any(styles.get(k, "replicated") != "replicated" for k in kinds):
            if tp > size:
                raise LayoutError(f"tp={tp} exceeds the {what} {size}")
            shares[unit] = split_evenly(size, tp)[tp_rank]
    heads = Heads((0, spec.heads), (0, spec.kv_heads))
    if styles["qkv"] != "replicated":
        heads = head_split(spec.heads, spec.kv_heads, tp)[tp_rank]
    return heads, shares["ffn"], shares["vocab"]


def batch_shares(batch: int, layout: Layout) -> list[range]:
    """The rows of a (batch, seq) input each EP rank computes: an even share each under EP, else all.

    The ranks of an EP group take the same ids, and each holds every weight but the routed
    experts. Splitting the batch's rows over them makes everything but the experts data
    parallel within the group (vLLM's DP attention): each rank runs attention, the dense
    layers and the LM head on its rows alone, and a sparse layer's all-to-all sends each
    (token, expert) row to the expert's rank. A rank may get no rows (batch < ep); it still
    takes part in every collective, computing its experts for the others.
    """
    return [range(lo, hi) for lo, hi in split_evenly(batch, layout.ep)]


def expert_shares(spec: ModelSpec, layout: Layout) -> list[range]:
    """The routed experts each EP rank holds, as ``layout.expert_placement`` says: a contiguous run each, as even as
    the count allows (6 over EP 4 is 0-1, 2-3, 4, 5), or round-robin (rank r every ep-th expert from r: 0,4 / 1,5 /
    2 / 3), which spreads neighbouring experts, often alike in load, over ranks. The one place that decides it: the
    plan's boxes and the dispatch's routing both read it."""
    if layout.ep == 1:
        return [range(spec.experts)]
    if not spec.experts:
        raise LayoutError(f"ep={layout.ep} needs a mixture of experts; {spec.arch} has none")
    if layout.ep > spec.experts:
        raise LayoutError(f"ep={layout.ep} exceeds the {plural(spec.experts, 'routed expert')}: some rank would hold "
                          "none")
    if layout.expert_placement == "round-robin":
        return [range(r, spec.experts, layout.ep) for r in range(layout.ep)]
    return [range(lo, hi) for lo, hi in split_evenly(spec.experts, layout.ep)]


def _resident_buffers(work: dict[str, ShardedTensor], alias: dict[str, str]) -> tuple[Buffer, ...]:
    """One buffer per work tensor; an alias is a second view of its target's buffer."""
    views: dict[str, list[View]] = {}
    for name, t in work.items():
        views.setdefault(alias.get(name, name), []).append(View(name, 0, t.shape))
    return tuple(Buffer(name, work[name].numel, tuple(v)) for name, v in views.items())


def _shared_storage(work: dict[str, ShardedTensor]) -> dict[str, str]:
    """Tensors of this rank that hold the same bytes as an earlier one, laid out alike (a tied LM head beside its
    embedding), mapped to it: they share one buffer, one read and one gradient."""
    alias: dict[str, str] = {}
    for i, (name, t) in enumerate(work.items()):
        for first, u in list(work.items())[:i]:
            if first not in alias and t.shape == u.shape and len(t.boxes) == len(u.boxes) and all(
                    a.same_bytes(b) and a.offset == b.offset for a, b in zip(t.boxes, u.boxes)):
                alias[name] = first
                break
    return alias
