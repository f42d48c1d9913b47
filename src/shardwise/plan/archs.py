"""One table per architecture: every tensor kind a checkpoint holds, and how it is split, fused, used and started.

A kind is one local tensor the model computes with (``qkv``, ``o``, ``gate_up`` ...). Its
entry says everything about it once: the checkpoint tensors it is made of (``Part``: a
name with ``{n}`` for the layer, its global shape in named sizes, and the rows or columns
of it the part covers), how tensor parallelism splits it (``style``, in HF's TP-plan
vocabulary), whether it is applied head by head (so a region several TP ranks hold has
partial gradients), how it is initialised and which column of the memory report it
counts in. The planner, the gradient reducer, initialisation, the plan report and the
spec's list of checkpoint tensors all read these tables; adding a tensor is one entry.

Sizes are named, not numbers: ``q`` is heads x head_dim, ``kv`` KV heads x head_dim,
``ffn`` the intermediate size, ``vocab``, ``hidden``, ``head_dim``; a mixture of experts adds
``experts`` (routed experts), ``moe_ffn`` (one expert's intermediate size), ``shared_ffn``
(the shared expert's) and ``one``. A part's ``unit`` is the size TP splits it by: the rank's
query heads (``q``), its KV heads (``kv``), its ffn range (``ffn``) or its vocab range
(``vocab``); ``None`` keeps it whole.

A routed expert's kind (``expert``) names its parts with ``{e}`` as well as ``{n}``: its local
tensor stacks every expert the rank computes, each expert's parts in turn, along dim 0, so
which experts a rank holds is a list of boxes like any other split. ``when="sparse"`` kinds
are in the layers that route to experts, ``when="dense"`` ones in the others.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

STYLES = ("colwise", "colwise_gather_output", "rowwise", "embedding_rowwise", "replicated",
          "replicated_with_grad_allreduce")
"""The built-in TP styles a kind may have (HF's names; "replicated" is what a plan leaves out). A plan may give
a kind another style its built-in one allows (``tp.ACCEPTS``)."""

INITS = ("normal", "residual", "ones", "zeros")
"""normal(0, std); normal scaled by 1/sqrt(2 layers) for projections into the residual stream; ones for norm
gains; zeros for biases."""

REPORTS = ("embedding", "attention", "mlp", "experts", "norms", "lm_head")


@dataclass(frozen=True)
class Part:
    """The rows (dim 0) or columns (dim 1) of checkpoint tensor ``source`` that a local tensor stacks, split by
    ``unit`` when the kind is split; ``at`` is where the part starts in a packed source, in named sizes."""

    source: str
    shape: tuple[str, ...]
    unit: str | None = None
    at: tuple[str, ...] = ()


@dataclass(frozen=True)
class Kind:
    """One local tensor: its parts, stacked along dim 0 (dim 1 for ``rowwise``), and what else it needs said once."""

    local: str
    parts: tuple[Part, ...]
    style: str = "replicated"
    per_head: bool = False
    init: str = "normal"
    report: str = "norms"
    when: str | None = None  # a ModelSpec flag that must be set for the checkpoint to hold this kind
    follows: str | None = None  # split exactly as this kind is, whatever the plan says (a bias, a full-width norm)
    expert: bool = False  # one copy per routed expert, ``{e}`` in its part names (see the module docstring)

    def __post_init__(self) -> None:
        if self.style not in STYLES or self.init not in INITS or self.report not in REPORTS:
            raise ValueError(f"kind {self.local!r}: style {self.style!r}, init {self.init!r}, report {self.report!r}")


@dataclass(frozen=True)
class Routing:
    """How a mixture of experts' config.json describes its routing, and the one numeric choice that differs."""

    experts: tuple[str, ...]  # the keys of the routed-expert count, the first one present read
    expert_ffn: str  # the key of one expert's intermediate size
    norm_topk: str | bool  # the key of the switch that renormalizes the top-k weights, or always
    sparse_step: bool = True  # ``decoder_sparse_step`` and ``mlp_only_layers`` pick the sparse layers (else all are)
    shared_ffn: str | None = None  # the key of the shared expert's intermediate size
    weights_in_fp32: bool = False
    """The top-k weights multiply the expert outputs in fp32 (Mixtral), not cast to the activations' dtype first."""


@dataclass(frozen=True)
class Arch:
    """An architecture: the kinds of its embedding block, of each decoder layer, and of its head block, and the few
    ways its math departs from Llama's."""

    name: str
    embed: tuple[Kind, ...]
    layer: tuple[Kind, ...]
    head: tuple[Kind, ...]
    flags: tuple[tuple[str, str | bool], ...] = ()
    """Which optional kinds (a ``Kind.when`` flag) the checkpoint holds: always (True), or as a config.json
    switch says (its key). A flag not named is off: Mistral's modeling ignores ``attention_bias``."""
    pairs: tuple[tuple[str, str], ...] = (("qkv", "o"), ("gate_up", "down"))
    """The (in, out) projections whose TP styles must fit together: the out one reads what the in one leaves."""
    defaults: tuple[tuple[str, object], ...] = ()
    """HF's config defaults where they differ from Llama's: what a config.json that omits the key means."""
    ropes: tuple[str, ...] = ("default", "linear", "llama3")
    """The rope types shardwise computes for it (Phi-3's HF config accepts only default and longrope)."""
    window_every_layer: bool = False
    """config.json's ``sliding_window`` applies to every layer (Mistral, Phi-3), not as ``use_sliding_window``
    and ``layer_types`` say (Qwen2)."""
    post_norms: bool = False
    """RMSNorms on each sublayer's output, before the residual add, and none on its input (OLMo-2)."""
    fp32_scale: bool = False
    """RMSNorm gains and rope's cos/sin multiply in fp32 and the product is cast back once (OLMo-2), where Llama
    casts first and multiplies in the activations' dtype."""
    routing: Routing | None = None
    """A mixture of experts: how its config routes tokens (None: a dense model)."""
    qk_norm: str = "head"
    """What the q/k norms normalize over: each head (``head``, Qwen3: one head_dim gain shared by every head) or
    the whole projection (``full``, OLMo-2: gains as wide as q and k, split with their heads)."""

    def kinds(self) -> tuple[Kind, ...]:
        return self.embed + self.layer + self.head

    def kind(self, local: str) -> Kind:
        """The entry of a kind's local name (``qkv``; a ``TensorName``'s ``kind``)."""
        for kind in self.kinds():
            if kind.local == local:
                return kind
        raise KeyError(f"{self.name}: no tensor kind {local!r}")


def _attention(prefix: str, suffix: str) -> tuple[Part, ...]:
    return (Part(f"{prefix}.q_proj.{suffix}", ("q", "hidden")[: 2 if suffix == "weight" else 1], "q"),
            Part(f"{prefix}.k_proj.{suffix}", ("kv", "hidden")[: 2 if suffix == "weight" else 1], "kv"),
            Part(f"{prefix}.v_proj.{suffix}", ("kv", "hidden")[: 2 if suffix == "weight" else 1], "kv"))


def _gate_up(prefix: str, suffix: str) -> tuple[Part, ...]:
    shape = ("ffn", "hidden") if suffix == "weight" else ("ffn",)
    return Part(f"{prefix}.gate_proj.{suffix}", shape, "ffn"), Part(f"{prefix}.up_proj.{suffix}", shape, "ffn")


def _packed(source: str, units: tuple[str, ...]) -> tuple[Part, ...]:
    """The row blocks of one checkpoint matrix that packs them (Phi-3's ``qkv_proj`` is [q; k; v], its
    ``gate_up_proj`` [gate; up]): each block starts where the ones before it end and is split by its own unit, so
    a rank reads only its query heads, its KV heads and its ffn range of the packed tensor, however uneven."""
    return tuple(Part(source, ("+".join(units), "hidden"), unit, at=units[:i]) for i, unit in enumerate(units))


def _norm(local: str, source: str) -> Kind:
    """An RMSNorm gain over the hidden state: whole on every rank, starting at one."""
    return Kind(local, (Part(source, ("hidden",)),), init="ones")


L = "model.layers.{n}"
EMBED = (Kind("embed", (Part("model.embed_tokens.weight", ("vocab", "hidden"), "vocab"),), "embedding_rowwise",
              report="embedding"),)
HEAD = (_norm("norm", "model.norm.weight"),
        Kind("lm_head", (Part("lm_head.weight", ("vocab", "hidden"), "vocab"),), "colwise_gather_output",
             report="lm_head"))
TIED_SOURCE = "model.embed_tokens.weight"
"""What a tied LM head reads instead of ``lm_head.weight``."""

ATTN_NORM = _norm("attn_norm", f"{L}.input_layernorm.weight")
QKV = Kind("qkv", _attention(f"{L}.self_attn", "weight"), "colwise", per_head=True, report="attention")
O_PROJ = Kind("o", (Part(f"{L}.self_attn.o_proj.weight", ("hidden", "q"), "q"),), "rowwise", init="residual",
              report="attention")
MLP_NORM = _norm("mlp_norm", f"{L}.post_attention_layernorm.weight")
GATE_UP = Kind("gate_up", _gate_up(f"{L}.mlp", "weight"), "colwise", report="mlp")
DOWN = Kind("down", (Part(f"{L}.mlp.down_proj.weight", ("hidden", "ffn"), "ffn"),), "rowwise", init="residual",
            report="mlp")
QKV_BIAS = Kind("qkv_bias", _attention(f"{L}.self_attn", "bias"), "colwise", per_head=True, init="zeros",
                report="attention", when="qkv_bias", follows="qkv")
O_BIAS = Kind("o_bias", (Part(f"{L}.self_attn.o_proj.bias", ("hidden",)),), init="zeros", report="attention",
              when="o_bias")

LLAMA_LAYER = (
    ATTN_NORM, QKV, O_PROJ, MLP_NORM, GATE_UP, DOWN, QKV_BIAS, O_BIAS,
    Kind("gate_up_bias", _gate_up(f"{L}.mlp", "bias"), "colwise", init="zeros", report="mlp", when="mlp_bias",
         follows="gate_up"),
    Kind("down_bias", (Part(f"{L}.mlp.down_proj.bias", ("hidden",)),), init="zeros", report="mlp", when="mlp_bias"),
    Kind("q_norm", (Part(f"{L}.self_attn.q_norm.weight", ("head_dim",)),), "replicated_with_grad_allreduce",
         per_head=True, init="ones", when="qk_norm"),
    Kind("k_norm", (Part(f"{L}.self_attn.k_norm.weight", ("head_dim",)),), "replicated_with_grad_allreduce",
         per_head=True, init="ones", when="qk_norm"),
)

PHI3_LAYER = (
    ATTN_NORM,
    Kind("qkv", _packed(f"{L}.self_attn.qkv_proj.weight", ("q", "kv", "kv")), "colwise", per_head=True,
         report="attention"),
    O_PROJ, MLP_NORM,
    Kind("gate_up", _packed(f"{L}.mlp.gate_up_proj.weight", ("ffn", "ffn")), "colwise", report="mlp"),
    DOWN,
)
"""Llama's layer with Phi-3's two packed projections, which HF's TP plan gathers whole on every rank."""

OLMO2_LAYER = (
    QKV, O_PROJ,
    # Over the whole projection, so split with its heads: a KV head several ranks hold is per head.
    Kind("q_norm", (Part(f"{L}.self_attn.q_norm.weight", ("q",), "q"),), "colwise", per_head=True, init="ones",
         when="qk_norm", follows="qkv"),
    Kind("k_norm", (Part(f"{L}.self_attn.k_norm.weight", ("kv",), "kv"),), "colwise", per_head=True, init="ones",
         when="qk_norm", follows="qkv"),
    _norm("attn_out_norm", f"{L}.post_attention_layernorm.weight"),
    GATE_UP, DOWN,
    _norm("mlp_out_norm", f"{L}.post_feedforward_layernorm.weight"),
    QKV_BIAS, O_BIAS,
)
"""No input norm: each sublayer's output is normalized before the residual add; q and k are normalized over all
heads, before rope."""


def _swiglu(local: str, prefix: str, gate: str, up: str, down: str, size: str, when: str | None,
            expert: bool = False) -> tuple[Kind, Kind]:
    """A SwiGLU MLP's two kinds, whole (a routed expert, a shared one): gate and up stacked, then down."""
    report = "experts" if expert else "mlp"
    return (Kind(f"{local}gate_up", (Part(f"{prefix}.{gate}.weight", (size, "hidden")),
                                     Part(f"{prefix}.{up}.weight", (size, "hidden"))), report=report, when=when,
                 expert=expert),
            Kind(f"{local}down", (Part(f"{prefix}.{down}.weight", ("hidden", size)),), init="residual", report=report,
                 when=when, expert=expert))


def _moe(block: str, gate: str, up: str, down: str) -> tuple[Kind, ...]:
    """A sparse layer's router (every expert's logits, replicated) and its routed experts."""
    return (Kind("router", (Part(f"{L}.{block}.gate.weight", ("experts", "hidden")),), report="mlp", when="sparse"),
            *_swiglu("experts_", f"{L}.{block}.experts.{{e}}", gate, up, down, "moe_ffn", "sparse", expert=True))


DENSE_MLP = (replace(GATE_UP, when="dense"), replace(DOWN, when="dense"))
QWEN_MOE = _moe("mlp", "gate_proj", "up_proj", "down_proj")
SHARED_EXPERT = (*_swiglu("shared_", f"{L}.mlp.shared_expert", "gate_proj", "up_proj", "down_proj", "shared_ffn",
                          "shared_expert"),
                 Kind("shared_gate", (Part(f"{L}.mlp.shared_expert_gate.weight", ("one", "hidden")),), report="mlp",
                      when="shared_expert"))
QK_NORMS = LLAMA_LAYER[-2:]

ATTENTION_BIAS = (("qkv_bias", "attention_bias"), ("o_bias", "attention_bias"))
ARCHS = {
    "llama": Arch("llama", EMBED, LLAMA_LAYER, HEAD, (*ATTENTION_BIAS, ("mlp_bias", "mlp_bias"))),
    "mistral": Arch("mistral", EMBED, LLAMA_LAYER, HEAD, window_every_layer=True),
    "qwen2": Arch("qwen2", EMBED, LLAMA_LAYER, HEAD, (("qkv_bias", True),)),
    "qwen3": Arch("qwen3", EMBED, LLAMA_LAYER, HEAD, (*ATTENTION_BIAS, ("qk_norm", True))),
    "phi3": Arch("phi3", EMBED, PHI3_LAYER, HEAD,
                 defaults=(("rms_norm_eps", 1e-5), ("max_position_embeddings", 4096),
                           ("original_max_position_embeddings", 4096)),
                 ropes=("default", "longrope"), window_every_layer=True),
    "olmo2": Arch("olmo2", EMBED, OLMO2_LAYER, HEAD, (*ATTENTION_BIAS, ("qk_norm", True)),
                  defaults=(("rms_norm_eps", 1e-5),), post_norms=True, fp32_scale=True, qk_norm="full"),
    "mixtral": Arch("mixtral", EMBED, (ATTN_NORM, QKV, O_PROJ, MLP_NORM, *_moe("block_sparse_moe", "w1", "w3", "w2")),
                    HEAD, window_every_layer=True,
                    routing=Routing(("num_local_experts",), "intermediate_size", True, sparse_step=False,
                                    weights_in_fp32=True)),
    "qwen2_moe": Arch("qwen2_moe", EMBED, (ATTN_NORM, QKV, O_PROJ, MLP_NORM, *DENSE_MLP, *QWEN_MOE, *SHARED_EXPERT,
                                           QKV_BIAS), HEAD, (("qkv_bias", True),),
                      routing=Routing(("num_experts",), "moe_intermediate_size", "norm_topk_prob",
                                      shared_ffn="shared_expert_intermediate_size")),
    "qwen3_moe": Arch("qwen3_moe", EMBED, (ATTN_NORM, QKV, O_PROJ, MLP_NORM, *DENSE_MLP, *QWEN_MOE, QKV_BIAS, O_BIAS,
                                           *QK_NORMS), HEAD, (*ATTENTION_BIAS, ("qk_norm", True)),
                      routing=Routing(("num_experts", "num_local_experts"), "moe_intermediate_size",
                                      "norm_topk_prob")),
}
"""Llama, Mistral, Qwen2 and Qwen3 share one layer: they differ in which optional kinds (biases, q/k norms) their
checkpoints hold. Phi-3 packs Llama's projections; OLMo-2 moves the norms. The mixtures of experts keep Llama's
attention and route some or all layers' MLPs to experts: Mixtral every layer, Qwen2-MoE and Qwen3-MoE the layers
their config makes sparse (the others keep a dense MLP), Qwen2-MoE beside a shared expert behind a sigmoid gate."""

