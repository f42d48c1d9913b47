"""The decoder forward pass, written once for every layout and architecture.

A rank runs one pipeline stage over its TP slice of each layer. The stage code reads
like a single-device model: the TP layers hide their collectives, and the only
pipeline logic is "receive the hidden state, run my layers, send it on". The math
follows HF transformers step for step (fp32 RMSNorm, the same rope frequencies),
which is what lets every layout match HF's logits. Where an architecture departs from
Llama (OLMo-2's norms, Phi-3's partial rotary and longrope), its table says so
(``Arch``) and the step takes that variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..dist.collectives import gather_rows
from ..dist.comm import Comm
from ..plan.boxes import split_evenly
from ..plan.rank import RankPlan, batch_shares
from ..providers.base import Provider
from .layers import embedding, gather_output, gather_tokens, linear, own_tokens, rms_norm, swiglu
from .moe import MoE
from .pipeline import Pass, walk
from .prompts import PromptTables
from .qk_norm import full_width_qk_norm

if TYPE_CHECKING:
    from ..providers.weights import Weights


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotation of the first ``cos.shape[-1]`` dims of each head (all of them, unless rotary is partial, as
    Phi-3's may be), the rest passed through; computed in cos's dtype and cast back to x's, as OLMo-2 does with
    its fp32 cos and sin (a no-op where they are x's dtype already)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values of one layer, for the rank's KV heads only."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, {end} were asked for")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def attention_mask(start: int, length: int, window: int | None, device: torch.device,
                   keys: torch.Tensor | None = None) -> torch.Tensor | None:
    """Causal (optionally sliding-window) mask for queries at ``start:start+length``; None when all keys are visible.

    ``keys`` (batch, start+length) marks real keys of a left-padded batch: padded ones are hidden from every
    query, giving a (batch, 1, length, start+length) mask. A padded query then sees no key at all, and SDPA
    would turn it into NaN, which a later layer's ``0 * NaN`` leaks into real rows; letting such a query see
    every key keeps its ignored output finite.
    """
    if keys is None and length == 1 and (window is None or start < window):
        return None
    q = torch.arange(start, start + length, device=device)[:, None]
    k = torch.arange(start + length, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    if keys is None:
        return allowed
    allowed = allowed & keys.bool()[:, None, None, :]
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def left_pad(prompts: Sequence[Sequence[int] | torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths as one left-padded (batch, longest) batch and its attention mask.

    Left, not right: every row's next token then comes from the same (last) column, as in HF.
    """
    if any(isinstance(p, int) for p in prompts):  # generate(text.encode(s), n) would read each id as a prompt
        raise ValueError("a list of prompts holds lists of ids (one per prompt); for a single prompt pass [ids]")
    rows = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    if not rows or any(r.dim() != 1 or len(r) == 0 for r in rows):
        raise ValueError("generate needs at least one prompt, each a non-empty list or 1-D tensor of ids")
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):], mask[i, longest - len(r):] = r, 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Rope positions of a left-padded batch, as HF's generate derives them: each row counts from its first real token.

    Padded slots get 0; they are masked keys, so their value never matters.
    """
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def gathered_sizes(plan: RankPlan, kind: str, share) -> list[int] | None:
    """The sizes of every TP rank's ``share`` of a ``colwise_gather_output`` kind's output, to gather it; None when
    the plan does not gather it."""
    if plan.styles[kind] != "colwise_gather_output":
        return None
    return [share(peer) for peer in plan.tp_peers()]


class Attention:
    """One layer's attention over this rank's heads (all of them where the plan replicates attention); the weights
    come with each call."""

    def __init__(self, plan: RankPlan, comm: Comm, n: int):
        spec, heads = plan.spec, plan.heads
        self.comm, self.eps = comm, spec.rms_eps
        self.qk_norm, self.fp32_scale = spec.table.qk_norm if spec.qk_norm else None, spec.table.fp32_scale
        self.n_q, self.n_kv, self.head_dim = heads.n_q, heads.n_kv, spec.head_dim
        self.widths = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim)
        self.split = plan.styles["qkv"] != "replicated"
        self.counts_kv = not self.split or first_to_hold_its_kv_heads(plan)
        self.window = spec.window(n)
        self.style, self.out_style = plan.styles["qkv"], plan.styles["o"]
        self.gathered = gathered_sizes(plan, "qkv", lambda peer: peer.heads.n_q * spec.head_dim)

    def __call__(self, x: torch.Tensor, w: dict[str, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, start: int,
                 cache: KVCache | None, keys: torch.Tensor | None = None, seq: list[int] | None = None
                 ) -> torch.Tensor:
        d = self.head_dim
        q, k, v = linear(self.comm, x, w["qkv"], w.get("qkv_bias"), self.style, seq).split(
            [self.n_q * d, self.n_kv * d, self.n_kv * d], dim=-1)
        b, t, _ = q.shape  # every token, under sequence parallelism too
        if self.qk_norm == "full":
            q, k = full_width_qk_norm(self.comm, q, k, w["q_norm"], w["k_norm"], self.eps, self.widths,
                                      self.counts_kv, self.fp32_scale, self.split)
        q, k, v = q.view(b, t, self.n_q, d), k.view(b, t, self.n_kv, d), v.view(b, t, self.n_kv, d)
        if self.qk_norm == "head":
            q, k = (rms_norm(q, w["q_norm"], self.eps, self.fp32_scale),
                    rms_norm(k, w["k_norm"], self.eps, self.fp32_scale))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start)
        mask = attention_mask(start, t, self.window, x.device, keys)
        causal = mask is not None and keys is None and start == 0 and self.window is None
        mask = None if causal else mask
        # Without a mask SDPA shares each KV head among its query heads itself (as HF calls it); repeating the
        # keys and values would copy the whole cache at every decode step.
        group = self.n_q // self.n_kv
        if group > 1 and mask is not None:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=group > 1 and mask is None)
        out = out.transpose(1, 2).reshape(b, t, self.n_q * d)
        if self.gathered:
            out = gather_output(self.comm, out, self.gathered)
        return linear(self.comm, out, w["o"], w.get("o_bias"), self.out_style, seq)


class MLP:
    """One layer's SwiGLU MLP over this rank's ffn slice (all of it where the plan replicates the MLP)."""

    def __init__(self, plan: RankPlan, comm: Comm):
        self.comm = comm
        self.style, self.out_style = plan.styles["gate_up"], plan.styles["down"]
        self.gathered = gathered_sizes(plan, "gate_up", lambda peer: peer.ffn[1] - peer.ffn[0])

    def __call__(self, x: torch.Tensor, w: dict[str, torch.Tensor], seq: list[int] | None = None) -> torch.Tensor:
        h = swiglu(linear(self.comm, x, w["gate_up"], w.get("gate_up_bias"), self.style, seq))
        if self.gathered:
            h = gather_output(self.comm, h, self.gathered)
        return linear(self.comm, h, w["down"], w.get("down_bias"), self.out_style, seq)


def first_to_hold_its_kv_heads(plan: RankPlan) -> bool:
    """Whether this rank is the lowest of its TP group holding its KV heads: with more TP ranks than KV heads a KV
    head sits on several, and a statistic over all KV heads must count it once."""
    return [peer.heads.kv for peer in plan.tp_peers()].index(plan.heads.kv) == plan.tp_rank


class DecoderLayer:
    """Pre-norm (Llama: each sublayer reads the normalized residual stream), or post-norm (OLMo-2: each sublayer
    reads the raw stream and its output is normalized before the residual add)."""

    def __init__(self, plan: RankPlan, comm: Comm, n: int):
        spec = plan.spec
        self.eps = spec.rms_eps
        self.post_norms, self.fp32_scale = spec.table.post_norms, spec.table.fp32_scale
        sparse = spec.sparse_layers[n] if spec.sparse_layers else False
        self.attn, self.mlp = Attention(plan, comm, n), MoE(plan, comm) if sparse else MLP(plan, comm)

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.eps, self.fp32_scale)

    def __call__(self, x, w, cos, sin, start, cache, keys=None, seq=None):
        """``x``: the residual stream, this rank's tokens of it with ``seq`` (sequence parallelism)."""
        if self.post_norms:
            x = x + self.norm(self.attn(x, w, cos, sin, start, cache, keys, seq), w["attn_out_norm"])
            return x + self.norm(self.mlp(x, w, seq), w["mlp_out_norm"])
        x = x + self.attn(self.norm(x, w["attn_norm"]), w, cos, sin, start, cache, keys, seq)
        return x + self.mlp(self.norm(x, w["mlp_norm"]), w, seq)


class Model(nn.Module):
    """One rank's stage of a decoder model (any architecture of ``plan.archs``).

    ``forward`` and ``generate`` are collective: every rank of a replica (its TP ranks
    and pipeline stages) calls them with the same input ids and gets the same
    full-vocabulary result; replicas (DP ranks) may feed different ids, but under
    ZeRO-3 or a series they move weights together, so they make the same calls.
    The weights reach the layers through ``provider``, block by block.
    ``close`` (or leaving a ``with`` block) frees the process groups, the shared
    memory and the weights, which a process loading many models would otherwise pile up.
    """

    def __init__(self, weights: Weights, comm: Comm, provider: Provider, device: torch.device):
        super().__init__()
        plan, spec = weights.plan, weights.plan.spec
        if spec.config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {spec.config['hidden_act']!r} is not supported (only silu)")
        self.plan, self.comm, self.spec = plan, comm, spec
        self.weights: Weights | None = weights
        self.provider: Provider | None = provider
        self.dtype, self.device = provider.dtype, device
        self.layers = {n: DecoderLayer(plan, comm, n) for n in plan.layers}
        # Sampling needs whole logits: a split head's are gathered whether its style says so or not.
        self.vocab_sizes = None if plan.styles["lm_head"] == "replicated" else [
            peer.vocab[1] - peer.vocab[0] for peer in plan.tp_peers()]
        self.register_buffer("inv_freq", spec.rope.inv_freq(spec.head_dim).to(self.device), persistent=False)
        self.register_buffer("long_inv_freq", spec.rope.inv_freq(spec.head_dim, long=True).to(self.device),
                             persistent=False)
        self.rope_dtype = torch.float32 if spec.table.fp32_scale else self.dtype
        self.caches: dict[int, KVCache] | None = None
        self.prompts: PromptTables | None = None  # prompt-learning tables (``load_model(prompt_tables=...)``)

    @property
    def closed(self) -> bool:
        return self.weights is None

    def close(self, sync: bool = True) -> None:
        """Free the process groups, the shared-memory segment and the weights; idempotent.

        Collective like loading: every rank calls it after its last forward (see
        ``Comm.close`` for ``sync``). The weights are dropped from the modules too, so
        their memory returns even while this object is still referenced.
        """
        if self.closed:
            return
        self.provider.close()
        self.comm.close(sync)
        self.weights, self.provider, self.caches, self.layers = None, None, None, {}

    def __enter__(self) -> Model:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # After an error the peers may never reach close(): a barrier would hang until the timeout, hiding the error.
        self.close(sync=exc_type is None)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for (seq,) positions shared by all rows, or (batch, seq) ones with a head axis added.

        As HF, per forward: longrope's long frequencies for every position once any lies beyond its original
        length, cos and sin scaled by its attention factor (1 for other ropes), and cast to the model's dtype,
        except OLMo-2's, which stay fp32.
        """
        rope = self.spec.rope
        long = rope.uses_long(positions)
        freqs = positions.float()[..., None] * (self.long_inv_freq if long else self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        if positions.dim() == 2:
            emb = emb[:, None]
        scale = rope.attention_factor
        return (emb.cos() * scale).to(self.rope_dtype), (emb.sin() * scale).to(self.rope_dtype)

    def forward(self, input_ids: torch.Tensor, start: int = 0, last_only: bool = False,
                attention_mask: torch.Tensor | None = None, local_vocab: bool = False) -> torch.Tensor:
        """Logits for ``input_ids`` (batch, seq) at positions ``start:``; with ``last_only`` just the final one.

        ``attention_mask`` (batch, start+seq) is HF's: 1 for real tokens, 0 for padding, covering the cached
        positions too. Padded keys are hidden and rope positions count from each row's first real token, so
        a left-padded row gets the logits it would get alone; a padded position's own logits are meaningless.
        Every stage derives this from the mask itself, so pipeline stages still only pass hidden states.

        Under grad mode, with weights that require a gradient, the TP collectives are autograd's (see
        ``layers``), so ``backward`` gives each rank the gradient of its local tensors, except the
        regions ``grads.tp_partials`` names (used per head by several TP ranks), which
        ``grads.PartialGradReducer`` sums. Pipeline stages do not pass gradients yet. With ``local_vocab``
        (pp=1) each TP rank returns only its vocab slice of the logits, ``plan.vocab``, as the
        vocab-parallel loss takes them.
        """
        if self.closed:
            raise RuntimeError(f"rank {self.comm.rank}: the model is closed")
        input_ids = input_ids.to(self.device)
        b, t = input_ids.shape
        keys = padding_keys(attention_mask, (b, start + t), self.device)
        rows = self.plan.batch_rows(b)
        input_ids = input_ids[rows.start:rows.stop]
        if keys is not None:
            keys = keys[rows.start:rows.stop]
        if keys is None:
            positions = torch.arange(start, start + t, device=self.device)
        else:
            positions = positions_from_mask(keys)[:, start:]
        cos, sin = self.rope(positions)

        seq = self.token_counts(t)

        def head(h: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.head(h, w, local_vocab, slice(-1, None) if last_only else None, seq)

        logits = walk(self, Pass(input_ids, cos, sin, start, self.caches, keys, seq), head)
        if logits is not None and self.plan.layout.ep > 1:
            logits = self.gather_rows(logits, b)
        if local_vocab:
            if self.plan.layout.pp > 1:
                raise ValueError(f"rank {self.comm.rank}: local_vocab=True needs pp=1 (stages pass full logits)")
            return logits
        out_shape = (b, 1 if last_only else t, self.spec.vocab)
        return self.comm.from_last_stage(logits, out_shape, self.dtype, self.device)

    def gather_rows(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """Every EP rank's rows of ``x`` (``batch_rows``), in batch order; the backward keeps this rank's."""
        sizes = [len(rows) for rows in batch_shares(batch, self.plan.layout)]
        return gather_rows(x, sizes, self.comm.ep_group, self.comm.ep_shm)

    def token_counts(self, t: int) -> list[int] | None:
        """Under sequence parallelism, how many of ``t`` tokens each TP rank holds between the TP blocks (split
        evenly, uneven allowed); else None."""
        if not self.plan.layout.sp:
            return None
        return [hi - lo for lo, hi in split_evenly(t, self.plan.layout.tp)]

    def embed(self, ids: torch.Tensor, w: dict[str, torch.Tensor], seq: list[int] | None = None) -> torch.Tensor:
        """The "embed" block: this rank's vocab rows of the embedding, assembled over TP (or the whole table); with
        ``seq`` (sequence parallelism) this rank's tokens only. Ids past the vocabulary are the prompt tables'
        virtual tokens, looked up in their stack the same way."""
        rows = self.plan.work["embed"].boxes[0]
        split = self.plan.styles["embed"] != "replicated"
        vocab = self.spec.vocab
        virtual = ids >= vocab
        if self.prompts is None or not bool(virtual.any()):
            return embedding(self.comm, ids, w["embed"], (rows.start[0], rows.stop[0]) if split else None, seq)
        tokens = embedding(self.comm, ids.masked_fill(virtual, 0), w["embed"],
                           (rows.start[0], rows.stop[0]) if split else None, seq)
        prompts = embedding(self.comm, (ids - vocab).clamp(min=0), self.prompts.local.to(tokens.dtype),
                            self.prompts.rows if split else None, seq)
        return torch.where((virtual if seq is None else own_tokens(self.comm, virtual, seq))[..., None], prompts,
                           tokens)

    def head(self, h: torch.Tensor, w: dict[str, torch.Tensor], local_vocab: bool = False, keep: slice | None = None,
             seq: list[int] | None = None) -> torch.Tensor:
        """The "head" block: final norm and LM head on the positions ``keep`` (None: all); full-vocabulary logits,
        or this rank's slice (``local_vocab``, the whole vocabulary where the plan replicates the head: see
        ``vocab_slice``). With ``seq`` (sequence parallelism) ``h`` holds this rank's tokens: normed there, then
        gathered."""
        h = rms_norm(h, w["norm"], self.spec.rms_eps, self.spec.table.fp32_scale)
        if seq is not None:
            h = gather_tokens(self.comm, h, seq)
        if keep is not None:
            h = h[:, keep]
        logits = linear(self.comm, h, w["lm_head"], None, self.plan.styles["lm_head"])
        return logits if local_vocab or self.vocab_sizes is None else gather_output(self.comm, logits,
                                                                                     self.vocab_sizes)

    @property
    def vocab_slice(self) -> tuple[int, torch.distributed.ProcessGroup | None]:
        """Where this rank's slice of ``local_vocab`` logits starts, and the group its slices are spread over (None
        where every rank scores the whole vocabulary)."""
        if self.plan.styles["lm_head"] == "replicated":
            return 0, None
        return self.plan.vocab[0], self.comm.tp_group

    def _allocate_caches(self, batch: int, max_len: int) -> None:
        heads = self.plan.heads
        d = self.spec.head_dim
        self.caches = {n: KVCache(batch, heads.n_kv, max_len, d, self.dtype, self.device) for n in self.plan.layers}

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 eos_token_id: int | list[int] | None = None, on_token=None,
                 attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
                 task: str | Sequence[str] | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation, with a KV cache; returns prompt plus new ids.

        ``input_ids`` is a (batch, seq) tensor, left-padded where ``attention_mask`` is 0, or a list of
        prompts of any lengths (lists of ids or 1-D tensors), which are left-padded here. Either way the
        result is (batch, seq + new) with the padding kept on the left, as HF's generate returns it. The pad
        id is ``pad_token_id``, else the first EOS id, else 0; finished rows continue with it too.

        Every rank samples from the same broadcast logits with the same seeded
        generator, so all ranks agree on every token without another collective.
        ``on_token(ids)`` is called with each new (batch,) tensor of ids, for streaming.

        ``task`` (one for the batch, or one per row) prepends that task's prompt table's virtual tokens
        to each prompt, as PEFT's prompt tuning does; they are not part of the result.
        """
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())
        pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        ids, mask = self._as_batch(input_ids, attention_mask, pad)
        virtual = 0
        if task is not None:
            ids, mask, virtual = self._with_prompts(ids, mask, task, pad)
        b, t = ids.shape
        if mask is not None:  # generated tokens are always real, like the ones HF appends to the mask
            mask = torch.cat([mask, mask.new_ones(b, max_new_tokens)], dim=1)
        self._allocate_caches(len(self.plan.batch_rows(b)), t + max_new_tokens)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        eos = torch.tensor(eos_ids, dtype=ids.dtype, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        out, step_ids, start = [ids], ids, 0
        try:
            for _ in range(max_new_tokens):
                end = start + step_ids.shape[1]
                if self._recompute_cache(start, end):
                    step_ids, start = torch.cat(out, dim=1), 0
                step_mask = None if mask is None else mask[:, :end]
                logits = self.forward(step_ids, start=start, last_only=True, attention_mask=step_mask)[:, -1].float()
                start = end
                nxt = sample(logits, temperature, top_k, top_p, gen)
                if eos_ids:
                    nxt = torch.where(done, pad, nxt)  # finished rows are padded
                    done |= torch.isin(nxt, eos)
                out.append(nxt[:, None])
                if on_token is not None:
                    on_token(nxt)
                if eos_ids and self._finished(done):
                    break
                step_ids = nxt[:, None]
        finally:
            self.caches = None
        return torch.cat(out, dim=1)[:, virtual:]

    def _with_prompts(self, ids: torch.Tensor, keys: torch.Tensor | None, task: str | Sequence[str], pad: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Each row's task's virtual tokens prepended (rows of shorter tables left-padded to the longest), the
        padding mask to match, and how many columns were prepended."""
        if self.prompts is None:
            raise ValueError(f"rank {self.comm.rank}: task {task!r} asks for a prompt table, and none is loaded "
                             "(load_model(prompt_tables=...), --prompt-table)")
        b, t = ids.shape
        tasks = [task] * b if isinstance(task, str) else list(task)
        if len(tasks) != b:
            raise ValueError(f"{len(tasks)} tasks for a batch of {b}: give one task, or one per row")
        prefixes = [self.prompts.ids(name, self.spec.vocab).to(ids.device) for name in tasks]
        width = max(len(p) for p in prefixes)
        pre = torch.full((b, width), pad, dtype=ids.dtype, device=ids.device)
        real = torch.zeros(b, width, dtype=torch.bool, device=ids.device)
        for i, p in enumerate(prefixes):
            pre[i, width - len(p):], real[i, width - len(p):] = p, True
        keys = torch.cat([real, keys if keys is not None else torch.ones(b, t, dtype=torch.bool, device=ids.device)],
                         dim=1)
        return torch.cat([pre, ids], dim=1), None if bool(keys.all()) else keys, width

    def _recompute_cache(self, start: int, end: int) -> bool:
        """Whether this step reruns the whole sequence: HF's Phi-3 generate drops its cache the first time the
        sequence outgrows longrope's original length (``prepare_inputs_for_generation``), so that every key is
        rotated again with the long frequencies instead of keeping the short ones it was cached with."""
        rope = self.spec.rope
        return rope.kind == "longrope" and 0 < start <= rope.original_max_positions < end

    def _finished(self, done: torch.Tensor) -> bool:
        """Every row has ended; replicas moving weights together (ZeRO-3, a series) stop only when all theirs have."""
        finished = bool(done.all())
        return self.comm.dp_all(finished) if self.provider.lockstep else finished

    def _as_batch(self, input_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
                  attention_mask: torch.Tensor | None, pad: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One (batch, seq) id tensor and its padding mask, the mask None when nothing is padded (the fast path)."""
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
            ids, mask = input_ids, attention_mask
        elif attention_mask is not None:
            raise ValueError("attention_mask goes with a (batch, seq) tensor; a list of prompts is padded here")
        else:
            ids, mask = left_pad(input_ids, pad)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab):  # TP would embed zeros
            raise ValueError(f"token ids must lie in [0, {self.spec.vocab}), got {int(ids.min())}..{int(ids.max())}")
        keys = padding_keys(mask, tuple(ids.shape), self.device)
        if keys is not None and not bool(keys[:, -1].all()):
            raise ValueError("generate needs left padding: every row's last token must be real")
        return ids.to(self.device), keys


def padding_keys(mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    """An attention mask as booleans; None when it pads nothing, so unpadded batches keep the fast path."""
    if mask is None:
        return None
    if tuple(mask.shape) != shape:
        raise ValueError(f"attention_mask must have shape {shape} (batch, cached + new), got {tuple(mask.shape)}")
    keys = mask.to(device=device, dtype=torch.bool)
    return None if bool(keys.all()) else keys


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)
