"""Layer-sharded weight series: one same-shaped tensor per layer, each layer's stored on one rank only.

Data-parallel replicas each keep every weight, yet a series of same-shaped tensors
(every layer's o_proj, or down_proj) need not live everywhere: layer ``j`` of the
series is stored by DP rank ``j % n`` alone and broadcast into a ring of ``k + 1``
windows just before use (vllm-ascend's "shared weight series"). Each rank then holds
about 1/n of those bytes, plus the windows.

Here a series is data, not hooks: a declaration (``Series``) names a pattern over a
layer's local tensors, a layer range and the prefetch step ``k``, and ``plan_series``
turns it into the tensors of each stage and the DP rank that owns each. The plan
leaves the tensors a rank does not own out of what it holds, so loading never reads
them and export and save_sharded, which follow holdings, need nothing new. Every
mistake in a declaration is found here, before any byte is read.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from ..words import plural
from .boxes import ShardedTensor


class SeriesError(ValueError):
    """A series declaration that cannot be honoured on this model and layout."""


@dataclass(frozen=True)
class Series:
    """A series declaration: ``pattern`` over local tensor names (``*.o``, ``layers.*.down``), the model layers
    ``layers = (lo, hi)`` it spans (None: all), and ``prefetch`` (k), how many layers ahead a broadcast starts."""

    pattern: str
    layers: tuple[int, int] | None = None
    prefetch: int = 1

    def __str__(self) -> str:
        span = "" if self.layers is None else f",layers={self.layers[0]}:{self.layers[1]}"
        return f"{self.pattern},k={self.prefetch}{span}"

    @classmethod
    def parse(cls, text: str) -> Series:
        """``PATTERN[,k=K][,layers=LO:HI]``, as the CLI and sharded manifests write a declaration."""
        pattern, *options = text.split(",")
        fields: dict = {}
        for option in options:
            key, _, value = option.partition("=")
            try:
                if key == "k" and "prefetch" not in fields:
                    fields["prefetch"] = int(value)
                elif key == "layers" and "layers" not in fields:
                    lo, hi = value.split(":")
                    fields["layers"] = (int(lo), int(hi))
                else:
                    raise ValueError
            except ValueError:
                raise SeriesError(f"series {text!r}: cannot read {option!r} (write PATTERN[,k=K][,layers=LO:HI], "
                                  "e.g. '*.o,k=1,layers=0:24')") from None
        if not pattern:
            raise SeriesError(f"series {text!r}: no pattern (e.g. '*.o' or '*.down')")
        return cls(pattern, **fields)


@dataclass(frozen=True)
class SeriesPlan:
    """One series on one rank's stage: the local tensor of each of its layers, in order, and their owners.

    ``owners[j]`` is the DP rank that stores ``names[j]``; every other DP rank receives
    it into one of the ring's ``prefetch + 1`` windows of ``shape``.
    """

    series: Series
    names: tuple[str, ...]
    owners: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def prefetch(self) -> int:
        return self.series.prefetch

    @property
    def windows(self) -> int:
        return self.prefetch + 1

    def owned(self, dp_rank: int) -> list[str]:
        return [name for name, owner in zip(self.names, self.owners) if owner == dp_rank]


def plan_series(declared: Iterable[Series], work: dict[str, ShardedTensor], stage_layers: range, model_layers: int,
                dp: int) -> tuple[SeriesPlan, ...]:
    """Each declaration's tensors on this stage, owned round-robin by the DP ranks; every mistake a ``SeriesError``.

    A declaration must match one tensor in at least two of the stage's layers, at most one per
    layer, all of one shape, with ``0 <= k <= layers - 2`` (k + 1 windows must be fewer than the
    layers, or nothing is saved), and claim no tensor another series has.
    """
    out, claimed = [], {}
    for series in declared:
        if not isinstance(series, Series):
            raise SeriesError(f"series {series!r}: a declaration is a shardwise.Series (Series.parse('{series}') "
                              "reads the CLI form)")
        lo, hi = series.layers if series.layers is not None else (0, model_layers)
        if dp < 2:
            raise SeriesError(f"series {series}: a series spreads layers over the DP group, and dp={dp} leaves no "
                              "rank to share with (use --dp 2 or more)")
        if not 0 <= lo < hi <= model_layers:
            raise SeriesError(f"series {series}: layers {lo}:{hi} are not a range within the model's "
                              f"{plural(model_layers, 'layer')}")
        span = [n for n in stage_layers if lo <= n < hi]
        if not span:
            continue
        names = _matches(series, work, span)
        shapes = {work[name].shape for name in names}
        if len(shapes) > 1:
            raise SeriesError(f"series {series}: matches differently shaped tensors "
                              f"({', '.join(f'{n} {list(work[n].shape)}' for n in names)}): a series broadcasts "
                              "every layer into the same windows")
        if not 0 <= series.prefetch <= len(names) - 2:
            raise SeriesError(f"series {series}: k={series.prefetch} is out of range: with {len(names)} of its layers "
                              f"on this stage (layers {', '.join(str(n.block.layer) for n in names)}), k must satisfy "
                              f"0 <= k <= {len(names) - 2}")
        for name in names:
            if name in claimed:
                raise SeriesError(f"series {series} overlaps series {claimed[name]}: both claim {name}")
            claimed[name] = series
        out.append(SeriesPlan(series, tuple(names), tuple(j % dp for j in range(len(names))), shapes.pop()))
    return tuple(out)


def _matches(series: Series, work: dict[str, ShardedTensor], span: list[int]) -> list[str]:
    """The tensor the pattern names in each of the ``span`` layers that holds one.

    A layer without a match is left out rather than refused: a mixture of experts may mix dense
    layers in (Qwen3-MoE's ``mlp_only_layers``), and a series of expert tensors spans the sparse
    ones. A pattern matching nothing in any layer is a mistake.
    """
    names = [name for layer in span if (name := _match(series, work, layer))]
    if not names:
        shorts = ", ".join(name.kind for name in work if name.block.layer == span[0])
        raise SeriesError(f"series {series}: pattern {series.pattern!r} matches no tensor of layers "
                          f"{span[0]}:{span[-1] + 1} (the tensors of layer {span[0]} are {shorts}; "
                          "e.g. '*.o' or '*.down')")
    return names


def _match(series: Series, work: dict[str, ShardedTensor], layer: int) -> str | None:
    """The one local tensor of ``layer`` that the pattern names, if any."""
    found = [name for name in work if name.block.layer == layer and fnmatch.fnmatchcase(name, series.pattern)]
    if not found:
        return None
    if len(found) > 1:
        shapes = {work[n].shape for n in found}
        kind = "differently shaped tensors" if len(shapes) > 1 else f"{len(found)} tensors"
        raise SeriesError(f"series {series}: pattern {series.pattern!r} matches {kind} in layer {layer} "
                          f"({', '.join(f'{n} {list(work[n].shape)}' for n in found)}); a series holds one tensor "
                          "per layer: declare one series for each")
    return found[0]
