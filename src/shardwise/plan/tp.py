"""TP plans in HF's vocabulary: which style splits each module, resolved to one style per tensor kind.

A plan is HF's dict of module names, with ``*`` standing for a layer index, to a style:
``{"model.layers.*.mlp.gate_proj": "colwise", ...}``. Keys relative to the base model
(``layers.*.mlp.gate_proj``, as ``base_model_tp_plan`` spells them) mean the same. What a
plan leaves out is replicated, as in HF. The architecture's table gives each kind its
built-in style, so the built-in plan is read off the table (``builtin_plan``); a user's
plan, or one ``config.json`` carries, replaces it.

``resolve`` turns a plan into one style per kind and refuses, in one line each, what
cannot run: an unknown style, a style HF has but shardwise does not run, the parts of
one fused kind split differently, a projection pair whose halves do not fit together,
a tied embedding split unlike its LM head. A rule no tensor matches is a warning,
where HF ignores it silently. Everything downstream (the boxes, the layers' collectives,
the gradient reductions) reads the resolved styles, so a replicated MLP is simply a
block whose tensors are whole on every rank and whose layers communicate nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from ..untrusted import UntrustedJSON, parse_json, shown
from .archs import Kind
from .mesh import LayoutError

if TYPE_CHECKING:
    from .spec import ModelSpec

log = logging.getLogger("shardwise.plan")

RUNS = {
    "colwise": "colwise",
    "packed_colwise": "colwise",  # a packed [gate; up] or [q; k; v] tensor: shardwise splits each part alike
    "colwise_gather_output": "colwise_gather_output",
    "colwise_rep": "colwise_gather_output",  # HF's alias
    "rowwise": "rowwise",
    "rowwise_split_input": "rowwise_split_input",
    "rowwise_rep": "rowwise_split_input",  # HF's alias
    "embedding_rowwise": "embedding_rowwise",
    "replicated_with_grad_allreduce": "replicated",
    "replicate": "replicated",
}
"""The styles shardwise runs, each mapped to the one it runs as. A replicated tensor's gradient needs no TP sum
here (every TP rank computes it whole from the same input), so ``replicated_with_grad_allreduce`` is replicated."""

HF_ONLY = ("embedding_colwise", "packed_rowwise", "sequence_parallel", "grouped_gemm", "ep_router", "moe_tp_experts",
           "moe_identity_expert", "mla_kv_a_proj", "all_reduce", "local_params", "unit_colwise", "unit_rowwise",
           "ep_dispatch_experts")
"""Styles in HF's vocabulary that shardwise does not run: refused by name rather than as unknown."""

ACCEPTS = {
    "colwise": ("colwise", "colwise_gather_output", "replicated"),
    "rowwise": ("rowwise", "rowwise_split_input", "replicated"),
    "embedding_rowwise": ("embedding_rowwise", "replicated"),
    "colwise_gather_output": ("colwise", "colwise_gather_output", "replicated"),
    "replicated": ("replicated",),
    "replicated_with_grad_allreduce": ("replicated",),
}
"""What a kind whose built-in style is the key may be given instead."""

PAIRS = {
    ("colwise", "rowwise"): ("colwise", "rowwise"),
    ("colwise_gather_output", "rowwise_split_input"): ("colwise", "rowwise"),  # the gather and the split cancel
    ("colwise_gather_output", "replicated"): ("colwise_gather_output", "replicated"),
    ("replicated", "replicated"): ("replicated", "replicated"),
}
"""The (in, out) projection pairs that run, and how: a gathered output re-split by the next projection computes
exactly what colwise then rowwise computes, without the all-gather (HF's Phi-3 and OLMo-2 plans)."""

TIED = {("embedding_rowwise", "colwise"), ("embedding_rowwise", "colwise_gather_output"), ("replicated", "replicated")}
"""A tied embedding and LM head are one tensor: both split over the vocabulary, or neither."""


class TpPlanError(LayoutError):
    """A TP plan shardwise cannot run, or cannot read."""


@dataclass(frozen=True)
class TpPlan:
    """A TP plan: (module pattern, style) rules in HF's vocabulary, and where they came from (for messages)."""

    rules: tuple[tuple[str, str], ...]
    origin: str = "the TP plan"

    @classmethod
    def of(cls, raw: Mapping | str | Path | TpPlan, origin: str | None = None) -> TpPlan:
        """A plan from a dict, or the path of a JSON file holding one (untrusted like any other input)."""
        if isinstance(raw, TpPlan):
            return raw
        if isinstance(raw, (str, Path)):
            path = Path(raw)
            try:
                raw = parse_json(path.read_bytes())
            except (OSError, UntrustedJSON) as e:
                raise TpPlanError(f"TP plan {path}: {e}") from None
            origin = origin or f"TP plan {path}"
        origin = origin or "the TP plan"
        if not isinstance(raw, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise TpPlanError(f"{origin}: holds {shown(raw)}, expected an object of module pattern -> style name")
        return cls(tuple((_full_name(k), v) for k, v in raw.items()), origin)

    def as_dict(self) -> dict[str, str]:
        return dict(self.rules)


def _full_name(pattern: str) -> str:
    """A rule's module pattern as the full model names it: ``base_model_tp_plan`` keys lack ``model.``."""
    return pattern if pattern.startswith("model.") or pattern.startswith("lm_head") else f"model.{pattern}"


def module_of(source: str) -> str:
    """The module pattern a checkpoint tensor belongs to: ``model.layers.{n}.mlp.up_proj.weight`` ->
    ``model.layers.*.mlp.up_proj``."""
    return source.replace("{n}", "*").replace("{e}", "*").rsplit(".", 1)[0]


def builtin_plan(spec: ModelSpec) -> dict[str, str]:
    """The architecture table's styles as HF's plan dict: one rule per module a kind with a style of its own
    reads (a fused kind names each of its modules). Kinds that follow another are left out."""
    out = {}
    for kind in spec.table.kinds():
        if spec.holds(kind) and kind.style != "replicated" and kind.follows is None:
            for part in kind.parts:
                out.setdefault(module_of(part.source), kind.style)
    return out


def plan_in_force(spec: ModelSpec, plan: TpPlan | None) -> TpPlan:
    """The user's plan, else the one ``config.json`` carries (``base_model_tp_plan``), else the built-in one."""
    if plan is not None:
        return plan
    if spec.tp_plan is not None:
        return spec.tp_plan
    return TpPlan(tuple(builtin_plan(spec).items()), f"{spec.arch}'s built-in TP plan")


@functools.lru_cache(maxsize=64)
def resolve(spec: ModelSpec, plan: TpPlan | None) -> dict[str, str]:
    """The style each kind the checkpoint holds runs with (kind name -> one of ``RUNS``' values; do not mutate).

    Raises ``TpPlanError`` naming the rule and what was expected; warns (once) of rules no tensor matches.
    """
    plan = plan_in_force(spec, plan)
    rules = dict(plan.rules)
    for pattern, style in plan.rules:
        if style not in RUNS:
            what = "is HF's, not one shardwise runs" if style in HF_ONLY else "is unknown"
            raise TpPlanError(f"{plan.origin}: {pattern!r}: style {style!r} {what} (valid: {', '.join(RUNS)})")
    kinds = [k for k in spec.table.kinds() if spec.holds(k)]
    used: set[str] = set()
    styles: dict[str, str] = {}
    for kind in kinds:
        if kind.follows is None:
            styles[kind.local] = _kind_style(kind, rules, used, plan.origin)
    for kind in kinds:
        if kind.follows is not None:
            styles[kind.local] = styles[kind.follows]
            used.update(p for p in map(module_of, (part.source for part in kind.parts)) if p in rules)
    _check_pairs(spec, styles, plan.origin)
    quiet = dist.is_initialized() and dist.get_rank() > 0  # the parent and rank 0 say it, not every rank
    for pattern in sorted(rules.keys() - used) if not quiet else ():
        log.warning("%s: rule %r matches no tensor of this %s model; it is ignored", plan.origin, pattern, spec.arch)
    return styles


def _kind_style(kind: Kind, rules: dict[str, str], used: set[str], origin: str) -> str:
    """One kind's style: every module it reads must be given the same one, and one its built-in style allows."""
    modules = list(dict.fromkeys(module_of(part.source) for part in kind.parts))
    given = {m: RUNS[rules[m]] if m in rules else "replicated" for m in modules}
    used.update(m for m in modules if m in rules)
    if kind.style == "replicated":  # a bias added after a reduce, a norm: whole wherever its module is split
        return "replicated"
    if len(set(given.values())) > 1:
        shown_ = ", ".join(f"{m.rsplit('.', 1)[-1]} {s}" for m, s in given.items())
        raise TpPlanError(f"{origin}: {shown_}: shardwise computes these as one fused {kind.local!r} projection; "
                          "give them one style")
    style = next(iter(given.values()))
    if style not in ACCEPTS[kind.style]:
        raise TpPlanError(f"{origin}: {modules[0]!r}: style {style!r} cannot split this tensor (it takes "
                          f"{' or '.join(ACCEPTS[kind.style])})")
    return style


def _check_pairs(spec: ModelSpec, styles: dict[str, str], origin: str) -> None:
    """The math of each projection pair (q/k/v then o, gate/up then down) must run, and a tied embedding must be
    split like its LM head; a gathered-then-split pair runs as colwise then rowwise (``PAIRS``)."""
    for first, second in spec.table.pairs:
        if first not in styles or second not in styles:
            continue
        pair = (styles[first], styles[second])
        if pair not in PAIRS:
            runs = "; ".join(f"{a} then {b}" for a, b in PAIRS)
            raise TpPlanError(f"{origin}: {first!r} {pair[0]} then {second!r} {pair[1]} cannot run (runnable: {runs})")
        styles[first], styles[second] = PAIRS[pair]
        for kind in spec.table.kinds():
            if kind.follows == first and kind.local in styles:
                styles[kind.local] = styles[first]
    if spec.tied and (styles["embed"], styles["lm_head"]) not in TIED:
        raise TpPlanError(f"{origin}: the tied embedding ({styles['embed']}) and LM head ({styles['lm_head']}) are "
                          "one tensor: split both over the vocabulary (embedding_rowwise, colwise) or neither")

