"""The `shardwise generate` job as every rank runs it: load, tokenize, stream, report."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .bench import rss_bytes
from .layout import Layout
from .loader import load_model
from .text import LabelledAnswers, Streamer, Text


@dataclass(frozen=True)
class GenerateArgs:
    checkpoint: str
    tp: int
    pp: int
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


def generate_rank(args: GenerateArgs) -> dict:
    """Collective: every rank loads its part and generates one batch of all the prompts; rank 0 prints.

    One prompt streams its answer token by token. Several are generated as one
    left-padded batch, and each answer is printed whole as soon as it is complete,
    labelled with its prompt's number.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    text = Text(args.checkpoint)  # before loading: a broken tokenizer or template should not cost a load
    prompts = [text.prompt_ids(p, args.chat) for p in args.prompts]
    streamer = None
    if args.stream and rank == 0:
        streamer = Streamer(text, sys.stdout) if len(prompts) == 1 else LabelledAnswers(text, sys.stdout, len(prompts))
    t0 = time.perf_counter()
    with load_model(args.checkpoint, Layout(args.tp, args.pp), device=args.device, dtype=args.dtype,
                    progress=False) as model:
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = model.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, eos_token_id=text.eos_ids(), on_token=streamer)
        gen_s = time.perf_counter() - t1
    width = max(len(p) for p in prompts)
    answers = [_until_eos(row[width:].tolist(), text.eos_ids()) for row in out]
    if streamer is not None:
        streamer.finish()
    rss = [rss_bytes()]
    if dist.is_initialized():
        rss = [None] * dist.get_world_size()
        dist.all_gather_object(rss, rss_bytes())
    new = sum(len(a) for a in answers)
    return {"texts": [text.decode(a) for a in answers], "new_tokens": new, "load_s": load_s, "generate_s": gen_s,
            "tokens_per_s": new / gen_s, "rss": rss}


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    """A row's new tokens up to and including its first EOS: what follows is padding of the batch."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids

