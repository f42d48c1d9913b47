"""What a checkpoint contains, derived from its ``config.json`` alone.

The spec is the contract the loader checks a checkpoint against: every tensor's HF
name, global shape and dtype. The architectures differ in their tables (``archs``) and a
few switches (QKV bias, q/k norms, explicit head_dim, sliding windows, rope), so one spec
class covers them all instead of a class per architecture.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..untrusted import UntrustedJSON, is_int, parse_json, shown
from .archs import ARCHS, TIED_SOURCE, Arch, Kind, Part
from .tp import TpPlan, TpPlanError, plan_in_force, resolve

SUPPORTED_ARCHS = tuple(ARCHS)
MAX_EXPERTS = 4096  # routed experts per layer (the largest open models have a few hundred)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class SpecError(ValueError):
    """The config describes a model shardwise cannot represent."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Rope:
    """Rotary embedding settings, read from config.json as HF reads them.

    ``partial`` is the fraction of head_dim rotated (Phi-3's ``partial_rotary_factor``; the rest passes through).
    ``longrope`` (Phi-3) has two frequency sets: a forward whose positions all lie within
    ``original_max_positions`` uses ``short_factor``, any longer one ``long_factor`` for every position, as
    HF decides per forward; cos and sin are scaled by ``attention_factor`` in both regimes.
    """

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    partial: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def rotary_dim(self, head_dim: int) -> int:
        """How many leading dims of each head rotate (``int(head_dim * partial)``, as HF truncates it)."""
        return int(head_dim * self.partial)

    def uses_long(self, positions: torch.Tensor) -> bool:
        """Whether a forward at ``positions`` rotates with longrope's long factors: any of them lies beyond the
        original length (read only for longrope, so that other ropes never wait for a device)."""
        return self.kind == "longrope" and positions.numel() > 0 and int(positions.max()) >= self.original_max_positions

    def inv_freq(self, head_dim: int, long: bool = False) -> torch.Tensor:
        """Per-pair rotation frequencies, computed exactly as HF does so logits match bit for bit; ``long`` picks
        longrope's long factors."""
        dim = self.rotary_dim(head_dim)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        if self.kind == "longrope":
            scale = torch.tensor(self.long_factor if long else self.short_factor, dtype=torch.float32)
            return 1.0 / (scale * self.theta ** exponents)
        inv = 1.0 / (self.theta ** exponents)
        if self.kind == "default":
            return inv
        if self.kind == "linear":
            return inv / self.factor
        # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        low_wavelen = self.original_max_positions / self.low_freq_factor
        high_wavelen = self.original_max_positions / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (self.original_max_positions / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled)


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    tied: bool
    dtype: torch.dtype
    rope: Rope
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    experts: int = 0  # routed experts of a mixture of experts (0: a dense model)
    top_k: int = 0  # experts each token is routed to
    moe_ffn: int = 0  # one expert's intermediate size
    shared_ffn: int = 0  # the shared expert's intermediate size (0: none)
    norm_topk: bool = False  # the top-k routing weights are renormalized to sum to one
    sparse_layers: tuple[bool, ...] = ()  # which layers route to experts
    aux_loss_coef: float = 0.0  # the balancing loss's weight in training (0: HF adds none, output_router_logits off)
    router_jitter: float = 0.0  # Mixtral's router_jitter_noise: HF's training scales the MoE input by random noise
    tp_plan: TpPlan | None = None  # config.json's base_model_tp_plan, which replaces the built-in plan
    table: Arch | None = None  # the architecture's table (every tensor kind, its parts, its split); None: ARCHS'
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # The table is part of the spec's identity, so plans cached per spec follow an edited table.
        if self.table is None:
            object.__setattr__(self, "table", ARCHS[self.arch])

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.heads // self.kv_heads

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    @cached_property
    def sizes(self) -> dict[str, int]:
        """The named sizes the architecture tables speak in (do not mutate)."""
        d = self.head_dim
        return {"hidden": self.hidden, "q": self.heads * d, "kv": self.kv_heads * d, "ffn": self.intermediate,
                "vocab": self.vocab, "head_dim": d, "experts": self.experts, "moe_ffn": self.moe_ffn,
                "shared_ffn": self.shared_ffn, "one": 1}

    def size(self, expr: str) -> int:
        """A named size, or a sum of them (``q+kv+kv``: the rows of a packed QKV projection)."""
        return sum(self.sizes[term] for term in expr.split("+"))

    @property
    def sparse(self) -> bool:
        """Some layer routes to experts (a ``when="sparse"`` kind's flag)."""
        return any(self.sparse_layers)

    @property
    def dense(self) -> bool:
        """Some layer has a dense MLP (a ``when="dense"`` kind's flag)."""
        return not all(self.sparse_layers) if self.sparse_layers else True

    @property
    def shared_expert(self) -> bool:
        return self.shared_ffn > 0

    def holds(self, kind: Kind, layer: int | None = None) -> bool:
        """Whether the checkpoint holds this kind (in ``layer``, or anywhere): its flag is set (biases, q/k norms,
        sparse or dense MLPs), or it needs none."""
        if layer is not None and kind.when in ("sparse", "dense") and self.sparse_layers:
            return self.sparse_layers[layer] == (kind.when == "sparse")
        return kind.when is None or getattr(self, kind.when)

    def source_of(self, part: Part, n: int, e: int = 0) -> str:
        """The checkpoint name of a part in layer ``n`` (of routed expert ``e``); a tied LM head reads the
        embedding."""
        name = part.source.format(n=n, e=e)
        return TIED_SOURCE if self.tied and name == "lm_head.weight" else name

    def sources(self) -> Iterator[tuple[str, Kind, Part]]:
        """Every checkpoint tensor name of the model, with the kind and part that read it, in table order (a tied LM
        head's reads the embedding, which comes first)."""
        for kind in self.table.kinds():
            for part in kind.parts:
                for n in range(self.layers) if "{n}" in part.source else (None,):
                    if self.holds(kind, n):
                        for e in range(self.experts) if kind.expert else (0,):
                            yield self.source_of(part, n or 0, e), kind, part

    @cached_property
    def source_kinds(self) -> dict[str, Kind]:
        """Every checkpoint tensor of the model, mapped to the first kind that reads it (do not mutate)."""
        out: dict[str, Kind] = {}
        for name, kind, _ in self.sources():
            out.setdefault(name, kind)
        return out

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor an HF checkpoint of this model holds, in HF names (computed once; do not mutate)."""
        return self._tensors

    @cached_property
    def _tensors(self) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for name, _, part in self.sources():
            out.setdefault(name, TensorInfo(tuple(self.size(s) for s in part.shape), self.dtype))
        return out


def _rope(cfg: dict, arch: Arch, head_dim: int) -> Rope:
    """Reads both the transformers<5 (`rope_theta` + `rope_scaling`) and >=5 (`rope_parameters`) spellings."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise SpecError(f"field 'rope_parameters' is {shown(params)}, expected an object")
    kind = params.get("rope_type", params.get("type", "default"))
    if arch.name == "phi3" and kind in ("su", "yarn"):  # Phi3Config's older names for longrope
        kind = "longrope"
    if kind not in arch.ropes:
        raise SpecError(f"rope type {shown(kind)} is not supported for {arch.name} (supported: "
                        f"{', '.join(arch.ropes)})")
    theta = _number(params if "rope_theta" in params else cfg, "rope_theta", 10000.0)
    partial = _partial_rotary(cfg, params, arch, head_dim)
    if kind == "default":
        return Rope(theta, partial=partial)
    if kind == "linear":
        return Rope(theta, "linear", factor=_number(params, "factor"), partial=partial)
    if kind == "llama3":
        return Rope(theta, "llama3", factor=_number(params, "factor"),
                    low_freq_factor=_number(params, "low_freq_factor"),
                    high_freq_factor=_number(params, "high_freq_factor"),
                    original_max_positions=_original_max_positions(cfg, params), partial=partial)
    return _longrope(cfg, params, theta, partial, head_dim)


def _partial_rotary(cfg: dict, params: dict, arch: Arch, head_dim: int) -> float:
    """The fraction of each head that rotates: Phi-3 reads it (``rope_parameters`` first, then the top level);
    elsewhere anything but 1 is refused, since HF's Llama-family rotation cannot apply it."""
    source = params if params.get("partial_rotary_factor") is not None else cfg
    value = 1.0 if source.get("partial_rotary_factor") is None else _number(source, "partial_rotary_factor")
    if value != 1.0 and arch.name != "phi3":
        raise SpecError(f"field 'partial_rotary_factor' is {value}, but {arch.name} rotates whole heads (expected 1)")
    rotary = int(head_dim * value)
    if value != 1.0 and (value > 1.0 or rotary < 2 or rotary % 2):
        raise SpecError(f"field 'partial_rotary_factor' is {value}: it rotates {rotary} of the {head_dim} dims of a "
                        "head, expected an even number from 2 to head_dim")
    return value


def _original_max_positions(cfg: dict, params: dict) -> int:
    """The pretraining length a scaled rope extends, where HF finds it: a top-level key outranks the rope
    parameters' (Phi-3 always has one, 4096 by default), and without either it is max_position_embeddings."""
    for source in (cfg, params):
        if "original_max_position_embeddings" in source:
            return _size(source, "original_max_position_embeddings")
    return _size(cfg, "max_position_embeddings")


def _longrope(cfg: dict, params: dict, theta: float, partial: float, head_dim: int) -> Rope:
    """Phi-3's longrope, as HF's ``_compute_longrope_parameters``: without ``factor`` the extension is
    max_position_embeddings / original_max_position_embeddings, and without ``attention_factor`` cos and sin are
    scaled by sqrt(1 + ln(factor) / ln(original)) when it extends at all."""
    original = _original_max_positions(cfg, params)
    factor = _number(params, "factor") if params.get("factor") is not None else \
        _size(cfg, "max_position_embeddings") / original
    if params.get("attention_factor") is not None:
        attention = _number(params, "attention_factor")
    elif factor <= 1.0:
        attention = 1.0
    elif original < 2:
        raise SpecError(f"field 'original_max_position_embeddings' is {original}: longrope's attention factor divides "
                        "by its logarithm, expected at least 2")
    else:
        attention = math.sqrt(1 + math.log(factor) / math.log(original))
    pairs = int(head_dim * partial) // 2
    short, long = (_factors(params, key, pairs) for key in ("short_factor", "long_factor"))
    return Rope(theta, "longrope", factor=factor, original_max_positions=original, partial=partial,
                short_factor=short, long_factor=long, attention_factor=attention)


def _factors(params: dict, key: str, pairs: int) -> tuple[float, ...]:
    """One positive, finite number per rotated pair: longrope divides each pair's frequency by its factor."""
    value = params.get(key)
    ok = isinstance(value, list) and len(value) == pairs and all(
        (is_int(v) or isinstance(v, float)) and math.isfinite(v) and v > 0 for v in value)
    if not ok:
        raise SpecError(f"field 'rope_parameters.{key}' is {shown(value)}, expected a list of {pairs} positive "
                        "numbers (one per rotated pair of dims)")
    return tuple(float(v) for v in value)


def _sliding_windows(cfg: dict, arch: Arch, layers: int) -> tuple[int | None, ...]:
    """Which layers attend through a sliding window, following each architecture's own switch."""
    if not cfg.get("sliding_window"):
        return ()
    window = _size(cfg, "sliding_window")
    if arch.window_every_layer:
        return (window,) * layers
    if not _flag(cfg, "use_sliding_window"):
        return ()
    types = cfg.get("layer_types")
    if types is not None:
        if not (isinstance(types, list) and len(types) == layers and all(isinstance(t, str) for t in types)):
            raise SpecError(f"field 'layer_types' is {shown(types)}, expected {layers} strings, one per layer")
        return tuple(window if t == "sliding_attention" else None for t in types)
    first_full = cfg.get("max_window_layers", layers)
    if not is_int(first_full) or first_full < 0:
        raise SpecError(f"field 'max_window_layers' is {shown(first_full)}, expected a non-negative integer")
    return tuple(window if n >= first_full else None for n in range(layers))


def _tp_plan(cfg: dict) -> TpPlan | None:
    """The plan a config.json carries, as older transformers saved it and users write it; read like a user's."""
    if cfg.get("base_model_tp_plan") is None:
        return None
    if not isinstance(cfg["base_model_tp_plan"], dict):  # never a path: a checkpoint must not name files to read
        raise SpecError(f"field 'base_model_tp_plan' holds {shown(cfg['base_model_tp_plan'])}, expected an object "
                        "of module pattern -> style name")
    try:
        return TpPlan.of(cfg["base_model_tp_plan"], "field 'base_model_tp_plan'")
    except TpPlanError as e:
        raise SpecError(str(e)) from None


def _size(cfg: dict, key: str, default: int | None = None) -> int:
    """A positive integer field of config.json (which, like every byte of a checkpoint, is untrusted)."""
    value = cfg.get(key)
    value = default if value is None else value
    if value is None:
        raise SpecError(f"lacks required field {key!r}")
    if not is_int(value) or value < 1:
        raise SpecError(f"field {key!r} is {shown(value)}, expected a positive integer")
    return value


def _number(cfg: dict, key: str, default: float | None = None) -> float:
    """A positive, finite number: a zero or NaN rope base or epsilon would turn every logit into NaN."""
    value = cfg.get(key, default)
    if value is None:
        raise SpecError(f"lacks required field {key!r}")
    if not (is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value <= 0:
        raise SpecError(f"field {key!r} is {shown(value)}, expected a positive number")
    return float(value)


def _flag(cfg: dict, key: str) -> bool:
    """A boolean field: ``bool("false")`` is True, so a string must not pass for one."""
    value = cfg.get(key, False)
    if not isinstance(value, bool):
        raise SpecError(f"field {key!r} is {shown(value)}, expected true or false")
    return value


def spec_from_config(cfg: dict) -> ModelSpec:
    if not isinstance(cfg, dict):
        raise SpecError(f"holds a {type(cfg).__name__}, expected an object")
    name = cfg.get("model_type")
    if not isinstance(name, str) or name not in SUPPORTED_ARCHS:
        raise SpecError(f"model_type {name!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    arch = ARCHS[name]
    read = dict(arch.defaults) | cfg  # what the config means; `cfg` itself is kept as written, for export
    hidden, heads = _size(read, "hidden_size"), _size(read, "num_attention_heads")
    layers = _size(read, "num_hidden_layers")
    kv_heads = _size(read, "num_key_value_heads", heads)
    intermediate, vocab = _size(read, "intermediate_size"), _size(read, "vocab_size")
    if heads % kv_heads:
        raise SpecError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = _size(read, "head_dim", hidden // heads)
    dtype_name = read.get("dtype") or read.get("torch_dtype") or "float32"
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise SpecError(f"config dtype {dtype_name!r} is not supported (supported: {', '.join(DTYPES)})")
    flags = {flag: value if isinstance(value, bool) else _flag(read, value) for flag, value in arch.flags}
    return ModelSpec(
        arch=name,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=vocab,
        rms_eps=_number(read, "rms_norm_eps", 1e-6),
        tied=_flag(read, "tie_word_embeddings"),
        dtype=DTYPES[dtype_name],
        rope=_rope(read, arch, head_dim),
        **flags,
        tp_plan=_tp_plan(cfg),
        sliding_windows=_sliding_windows(read, arch, layers),
        **_routing(read, arch, layers),
        config=cfg,
    )


def _routing(cfg: dict, arch: Arch, layers: int) -> dict:
    """A mixture of experts' fields: its experts, how many each token takes, their sizes, and which layers route."""
    routing = arch.routing
    if routing is None:
        return {}
    key = next((k for k in routing.experts if k in cfg), routing.experts[0])  # transformers 5 renamed Qwen3-MoE's
    experts, top_k = _size(cfg, key), _size(cfg, "num_experts_per_tok")
    if experts > MAX_EXPERTS:  # the tensor list grows with it: a hostile count would exhaust memory before any check
        raise SpecError(f"{key}={experts} exceeds the {MAX_EXPERTS} experts shardwise plans for")
    if top_k > experts:
        raise SpecError(f"num_experts_per_tok={top_k} exceeds the {experts} experts ({key})")
    sparse = (True,) * layers
    if routing.sparse_step:
        step, dense = _size(cfg, "decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
        if not isinstance(dense, list) or not all(is_int(n) for n in dense):
            raise SpecError(f"field 'mlp_only_layers' is {shown(dense)}, expected a list of layer numbers")
        dense = set(dense)
        sparse = tuple(n not in dense and (n + 1) % step == 0 for n in range(layers))
    norm = routing.norm_topk if isinstance(routing.norm_topk, bool) else _flag(cfg, routing.norm_topk)
    aux = _number(cfg, "router_aux_loss_coef", 0.001) if _flag(cfg, "output_router_logits") else 0.0
    jitter = _number(cfg, "router_jitter_noise") if cfg.get("router_jitter_noise") else 0.0
    return dict(experts=experts, top_k=top_k, moe_ffn=_size(cfg, routing.expert_ffn), norm_topk=norm,
                shared_ffn=_size(cfg, routing.shared_ffn) if routing.shared_ffn else 0, sparse_layers=sparse,
                aux_loss_coef=aux, router_jitter=jitter)


def naming_dtype(config: dict, dtypes: Iterable[torch.dtype]) -> dict:
    """``config`` naming the one dtype its checkpoint's files hold, as ``dtype`` (transformers 5's key) and, where
    the config spelled it so, ``torch_dtype``; unchanged when the files mix dtypes."""
    found = set(dtypes)
    if len(found) != 1:
        return config
    name = str(found.pop()).removeprefix("torch.")
    return config | {"dtype": name} | ({"torch_dtype": name} if "torch_dtype" in config else {})


def load_spec(path: str | Path) -> ModelSpec:
    """A spec from a checkpoint directory or a config.json path."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    try:
        cfg = parse_json(config_path.read_bytes())
    except FileNotFoundError:
        raise SpecError(f"{config_path}: no config.json found") from None
    except (OSError, UntrustedJSON) as e:
        raise SpecError(f"{config_path}: {e}") from None
    try:
        return spec_from_config(cfg)
    except SpecError as e:
        raise SpecError(f"{config_path}: {e}") from None


def tp_plan(checkpoint_or_config: str | Path | dict) -> dict[str, str]:
    """The TP plan in force for a checkpoint directory, a config.json path or a config dict, as HF's dict: the one
    its config.json carries (``base_model_tp_plan``), else its architecture's built-in plan; checked against the
    model, so a plan that cannot run raises here."""
    if isinstance(checkpoint_or_config, dict):
        spec = spec_from_config(checkpoint_or_config)
    else:
        spec = load_spec(checkpoint_or_config)
    resolve(spec, None)
    return plan_in_force(spec, None).as_dict()
