"""`shardwise generate`: the prompts and every check made before any rank is spawned, then the job as every rank
runs it: load, tokenize, stream, report."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..bench.measure import rss_bytes
from ..io.loader import Provide, load_model
from ..launch import launch
from ..model.text import LabelledAnswers, Streamer, Text
from ..plan.boxes import split_evenly
from ..plan.mesh import Layout
from ..plan.spec import load_spec
from ..words import plural
from .args import _is_rank0, _layout, _plan_everywhere, _provide, _world

log = logging.getLogger("shardwise")


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
    prompt_tables: tuple[tuple[str, str], ...] = ()  # (task, directory of a PEFT prompt-tuning adapter)
    task: str | None = None  # every prompt's task: its table's virtual tokens go first


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
    with load_model(args.checkpoint, layout, device=args.device, dtype=args.dtype,
                    prompt_tables=dict(args.prompt_tables) or None, **vars(provide)) as model:
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        answers: list[list[int]] = []
        if prompts or model.provider.lockstep:
            batch = prompts or [text.prompt_ids(args.prompts[0], args.chat)]
            out = model.generate(batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, eos_token_id=text.eos_ids(), on_token=streamer,
                                 task=args.task)
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
    replicas = [every[layout.rank_of(0, d, 0, 0)] for d in range(layout.dp)]
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



def _check_generate(args, prompts: tuple[str, ...], labels: tuple[str, ...], virtual: int = 0) -> None:
    """Every mistake a generate job could make, found before any rank is spawned (``virtual``: the prompt table's
    tokens each prompt starts with)."""
    from ..model.text import Text

    spec = _plan_everywhere(args.checkpoint, _layout(args), args.provider, tuple(args.series))
    _check_device(args.device, _layout(args).world_size)
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        log.warning("--top-k/--top-p have no effect without --temperature > 0 (greedy decoding)")
    ids = _prompt_ids(Text(args.checkpoint), prompts, args.chat, spec.vocab, labels)
    longest = max(len(i) for i in ids) + virtual
    _check_cache_fits(spec, _layout(args), len(ids), longest + args.max_new_tokens, args.dtype.itemsize)
    limit = spec.config.get("max_position_embeddings")
    if isinstance(limit, int) and longest + args.max_new_tokens > limit:
        log.warning("%d prompt + %d new tokens run past the model's %d positions; expect degraded text",
                    longest, args.max_new_tokens, limit)


def _prompt_tables(args) -> tuple[tuple[tuple[str, str], ...], int]:
    """``--prompt-table [TASK=]DIR`` as (task, directory) pairs, a bare DIR named by ``table_task``, each table
    checked against the model before any rank is spawned, ``--task`` one of them; and how many virtual tokens the
    task's table puts before each prompt."""
    from ..io.prompt_table import table_shape, table_task

    tables: dict[str, str] = {}
    lengths: dict[str, int] = {}
    for given in args.prompt_table:
        task, _, directory = given.partition("=") if "=" in given else (table_task(Path(given)), "", given)
        if task in tables:
            raise ValueError(f"--prompt-table {given}: task {task!r} is given twice")
        lengths[task] = table_shape(Path(directory), load_spec(args.checkpoint))
        tables[task] = directory
    if args.task is not None and args.task not in tables:
        raise ValueError(f"--task {args.task!r}: no --prompt-table of that task (given: {', '.join(tables) or 'none'})")
    return tuple(tables.items()), lengths.get(args.task, 0)


def _check_device(device: str, world: int) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # under torchrun, only this node's ranks need GPUs here
    if kind == "cuda" and torch.cuda.device_count() < local:
        raise ValueError(f"--device {device} needs {plural(local, 'GPU')}, this machine has "
                         f"{torch.cuda.device_count()}")


def _prompt_ids(text, prompts: tuple[str, ...], chat: bool, vocab: int, labels: tuple[str, ...]) -> list[list[int]]:
    """Each prompt's ids, refusing one that comes out empty or names tokens the model has no embedding for (named
    by its label, as its answer would be)."""
    out = []
    for n, prompt in zip(labels, prompts, strict=True):
        ids = text.prompt_ids(prompt, chat)
        if not ids:
            raise ValueError(f"prompt {n} ({prompt!r}) has no tokens; give the text to continue")
        if max(ids) >= vocab:
            raise ValueError(f"prompt {n} has token id {max(ids)}, but the model's vocabulary has {vocab} "
                             "(tokenizer and model disagree)")
        out.append(ids)
    return out


def _check_cache_fits(spec, layout: Layout, batch: int, positions: int, itemsize: int) -> None:
    """Refuse a KV cache larger than this machine's memory: it would fail deep inside a rank, or swap it to death."""
    kv_heads = -(-spec.kv_heads // layout.tp)
    per_rank = 2 * -(-spec.layers // layout.pp) * batch * kv_heads * positions * spec.head_dim * itemsize
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if per_rank * layout.world_size > memory:
        raise ValueError(f"a KV cache of {positions} positions for {plural(batch, 'prompt')} needs about "
                         f"{per_rank * layout.world_size / 2**30:.0f} GiB, more than this machine's "
                         f"{memory / 2**30:.0f} GiB; lower --max-new-tokens")


def _prompts(args) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every --prompt, then every non-blank line of --prompts FILE; and the labels of their answers, which print as
    they complete: the --prompt texts numbered in order, the file's by their line (blank lines counted), as
    FILE:LINE when both are given."""
    prompts = list(args.prompt or [])
    labels = [str(n) for n in range(1, len(prompts) + 1)]
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{args.prompts_file}: cannot read the prompts ({e})") from None
        where = f"{args.prompts_file}:" if prompts else ""
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        prompts += [line for _, line in numbered]
        labels += [f"{where}{n}" for n, _ in numbered]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    return tuple(prompts), tuple(labels)


def cmd_generate(args) -> None:
    prompts, labels = _prompts(args)
    provide = _provide(args)
    tables, virtual = _prompt_tables(args)
    _check_generate(args, prompts, labels, virtual)
    job = GenerateArgs(args.checkpoint, _layout(args), prompts, args.max_new_tokens, args.dtype, args.device,
                       args.chat, args.temperature, args.top_k, args.top_p, args.seed, provide=provide, labels=labels,
                       prompt_tables=tables, task=args.task)
    result = launch(generate_rank, _world(args), job)
    if _is_rank0():
        rss = " ".join(f"r{r}={b / 2**20:.0f}MiB" for r, b in enumerate(result["rss"]))
        print(f"[shardwise] {_layout(args)} {args.provider} load {result['load_s']:.2f}s, "
              f"{plural(result['new_tokens'], 'token')} at {result['tokens_per_s']:.1f} tok/s, rss {rss}",
              file=sys.stderr)
