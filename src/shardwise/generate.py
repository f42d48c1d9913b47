"""The `shardwise generate` job as every rank runs it: load, tokenize, stream, report."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .bench import rss_bytes
from .boxes import split_evenly
from .layout import Layout
from .loader import Provide, load_model
from .text import LabelledAnswers, Streamer, Text


@dataclass(frozen=True)
class GenerateArgs:
    checkpoint: str
    layout: Layout
    prompts: tuple[str, ...]
    max_new_tokens: int = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    chat: bool = False
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stream: bool = True
    provide: Provide = Provide()
    labels: tuple[str, ...] = ()  # each prompt's answer is printed as [label]; default its number, from 1


def generate_rank(args: GenerateArgs) -> dict:
    """Collective: every rank loads its part, and each DP replica generates one batch of its share of the prompts.

    Rank 0 prints. One prompt streams its answer token by token. Several are generated
    as left-padded batches, one per replica, and replica 0's answers are printed whole
    as soon as each is complete, labelled ``[label]``; the other replicas' follow when
    they are done. A replica with no prompt idles, except under ZeRO-3 or a
    series, where its gathers or broadcasts are needed: it generates a copy of the first
    prompt and drops it.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    layout, provide = args.layout, args.provide
    text = Text(args.checkpoint)  # before loading: a broken tokenizer or template should not cost a load
    labels = args.labels or tuple(str(n) for n in range(1, len(args.prompts) + 1))
    lo, hi = split_evenly(len(args.prompts), layout.dp)[layout.coords(rank)[1]]
    prompts = [text.prompt_ids(p, args.chat) for p in args.prompts[lo:hi]]
    streamer = None
    if args.stream and rank == 0:
        many = len(args.prompts) > 1
        streamer = LabelledAnswers(text, sys.stdout, labels[lo:hi]) if many else Streamer(text, sys.stdout)
    t0 = time.perf_counter()
    with load_model(args.checkpoint, layout, device=args.device, dtype=args.dtype, **vars(provide)) as model:
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        answers: list[list[int]] = []
        if prompts or model.provider.lockstep:
            batch = prompts or [text.prompt_ids(args.prompts[0], args.chat)]
            out = model.generate(batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, eos_token_id=text.eos_ids(), on_token=streamer)
            width = max(len(p) for p in batch)
            answers = [_until_eos(row[width:].tolist(), text.eos_ids()) for row in out][: len(prompts)]
        gen_s = time.perf_counter() - t1
    if streamer is not None:
        streamer.finish()
    mine = {"answers": answers, "first": lo, "generate_s": gen_s, "rss": rss_bytes()}
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    replicas = [every[layout.rank_of(0, d, 0)] for d in range(layout.dp)]
    if args.stream and rank == 0:
        for r in replicas[1:]:
            for i, ids in enumerate(r["answers"]):
                sys.stdout.write(f"[{labels[r['first'] + i]}] {text.decode(ids)}\n")
        sys.stdout.flush()
    answers = [a for r in replicas for a in r["answers"]]
    new = sum(len(a) for a in answers)
    gen_s = max(r["generate_s"] for r in every)
    return {"texts": [text.decode(a) for a in answers], "new_tokens": new, "load_s": load_s, "generate_s": gen_s,
            "tokens_per_s": new / gen_s, "rss": [r["rss"] for r in every]}


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    """A row's new tokens up to and including its first EOS: what follows is padding of the batch."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids

