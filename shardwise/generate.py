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
from .text import Streamer, Text


@dataclass(frozen=True)
class GenerateArgs:
    checkpoint: str
    tp: int
    pp: int
    prompt: str
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
    """Collective: every rank loads its part and generates; rank 0 streams the text to stdout."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    text = Text(args.checkpoint)  # before loading: a broken tokenizer or template should not cost a load
    prompt = text.chat_prompt(args.prompt) if args.chat else args.prompt
    ids = torch.tensor([text.encode(prompt)])
    streamer = Streamer(text, sys.stdout) if args.stream and rank == 0 else None
    t0 = time.perf_counter()
    with load_model(args.checkpoint, Layout(args.tp, args.pp), device=args.device, dtype=args.dtype,
                    progress=False) as model:
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, eos_token_id=text.eos_ids(), on_token=streamer)
        gen_s = time.perf_counter() - t1
    if streamer is not None:
        sys.stdout.write("\n")
        sys.stdout.flush()
    new = out[0, ids.shape[1] :].tolist()
    rss = [rss_bytes()]
    if dist.is_initialized():
        rss = [None] * dist.get_world_size()
        dist.all_gather_object(rss, rss_bytes())
    return {"text": text.decode(new), "new_tokens": len(new), "load_s": load_s, "generate_s": gen_s,
            "tokens_per_s": len(new) / gen_s, "rss": rss}
