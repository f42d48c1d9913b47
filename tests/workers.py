"""Functions the tests run inside spawned ranks; kept light so that ranks start fast."""

from __future__ import annotations

import os

import torch

from shardwise import Layout, load_model


def forward_and_generate(tp: int, pp: int, checkpoints: dict[str, str], ids: torch.Tensor, steps: int,
                         tp_plan: dict | None = None, sp: bool = False) -> dict:
    """Logits and greedy tokens of every checkpoint under one layout (and TP plan; ``sp``: sequence parallel)."""
    out = {}
    for name, path in checkpoints.items():
        with load_model(path, Layout(tp, pp, sp=sp), progress=False, tp_plan=tp_plan) as model:
            out[name] = (model(ids), model.generate(ids, steps))
    return out


def forward_under_plans(tp: int, checkpoints: dict[str, str], ids: torch.Tensor, steps: int,
                        plans: dict[str, dict | None]) -> dict:
    """Under each named TP plan, in one launch: each checkpoint's logits, greedy tokens and the all-reduces its
    forward made."""
    out: dict = {}
    for plan, tp_plan in plans.items():
        for name, path in checkpoints.items():
            with load_model(path, Layout(tp), progress=False, tp_plan=tp_plan) as model:
                calls = count_calls(model.comm, "tp_all_reduce")
                logits = model(ids)
                del model.comm.tp_all_reduce  # the class's again
                out.setdefault(plan, {})[name] = (logits, model.generate(ids, steps), len(calls))
    return out


def count_calls(obj, method: str) -> list:
    """Record each call of ``obj.method`` (its first argument's shape) in the returned list."""
    calls, original = [], getattr(obj, method)

    def counted(x, *args, **kwargs):
        calls.append(x.shape)
        return original(x, *args, **kwargs)

    setattr(obj, method, counted)
    return calls


def layout_from_world(pp: int) -> Layout:
    return Layout.from_world(pp=pp)


def load_only(path: str, tp: int, pp: int) -> int:
    return len(load_model(path, Layout(tp, pp), progress=False).weights.tensors)


def fail_on_rank(rank: int, how: str) -> None:
    """Make one rank fail in a given way while the others wait for it in a collective."""
    import torch.distributed as dist

    if dist.get_rank() == rank:
        if how == "raise":
            raise ValueError(f"boom on rank {rank}")
        if how == "die":
            os._exit(3)
        if how == "stall":
            import time

            time.sleep(3600)
    dist.barrier()



def reshard_all(srcs: dict[str, str], dsts: dict[str, str], tp: int, pp: int) -> None:
    """Load each source (HF or sharded) under tp x pp in its own dtypes, and save it sharded."""
    from shardwise import load_weights, save_sharded

    for name, src in srcs.items():
        save_sharded(load_weights(src, Layout(tp, pp), progress=False), dsts[name])


def export_all(srcs: dict[str, str], outs: dict[str, str], tp: int, pp: int) -> None:
    from shardwise import export, load_weights

    for name, src in srcs.items():
        export(load_weights(src, Layout(tp, pp), progress=False), outs[name], max_file_bytes=20_000)


def export_model(src: str, out: str, tp: int, pp: int) -> None:
    """Export straight from a running fp32 model, whatever the checkpoint's dtype was."""
    from shardwise import export

    export(load_model(src, Layout(tp, pp), progress=False), out)


def export_and_die(src: str, out: str, tp: int, dying_rank: int) -> None:
    """An export during which one rank is killed after writing its first box."""
    import torch.distributed as dist

    import shardwise.io.hf_export as ex
    from shardwise import export, load_weights

    write = ex._write_box

    def write_then_die(*args):
        write(*args)
        if dist.get_rank() == dying_rank:
            os._exit(9)

    ex._write_box = write_then_die
    export(load_weights(src, Layout(tp, 1), progress=False), out, max_file_bytes=20_000, overwrite=True)


def sample_on_every_rank(path: str, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each rank's sampled continuation under TP=2 x PP=2, gathered so the test can compare them."""
    import torch.distributed as dist

    out = load_model(path, Layout(2, 2), progress=False).generate(ids, 12, temperature=0.8, top_k=20, seed=7)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    return every


def process_resources() -> tuple[int, int, int]:
    """Open fds, RSS bytes, and mappings of shardwise segments (unlinked ones stay listed in maps while mapped)."""
    import re
    from pathlib import Path

    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024
    return len(os.listdir("/proc/self/fd")), rss, Path("/proc/self/maps").read_text().count("shardwise-")


def load_close_cycles(path: str, ids: torch.Tensor, cycles: int) -> list[dict]:
    """Every rank's resources after each TP=2 load/forward/close, then a with-block's logits and what it freed."""
    import weakref

    import torch.distributed as dist

    samples = []
    for _ in range(cycles):
        model = load_model(path, Layout(2, 1), progress=False)
        model(ids)
        model.close()
        samples.append(process_resources())
    with load_model(path, Layout(2, 1), progress=False) as model:
        on_shm = model.comm.shm is not None
        logits = model(ids)
        weights = [weakref.ref(t) for t in (*model.weights.tensors.values(), *model.parameters())]
    model.close()  # a second close is harmless
    freed = model.closed and all(w() is None for w in weights)  # the model lives on here, its weights must not
    mine = dict(samples=samples, on_shm=on_shm, logits=logits, freed=freed, after=process_resources())
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def logits_despite_shm_trouble(path: str, ids: torch.Tensor, trouble: str, other_dir: str) -> list[dict]:
    """Every rank's TP=2 logits with working shared memory, then under ``trouble``, and the warnings logged.

    ``too_small``: the segment outgrows /dev/shm itself, so the kernel refuses to reserve it.
    ``apart``: rank 1 looks for segments in ``other_dir``, like a container with a /dev/shm of its own.
    """
    import logging.handlers

    import torch.distributed as dist

    import shardwise.dist.shm as shm

    def run() -> tuple[torch.Tensor, bool]:
        with load_model(path, Layout(2, 1), progress=False) as model:
            return model(ids), model.comm.shm is not None

    normal = run()
    capacity, segment_dir = shm.CAPACITY, shm.SEGMENT_DIR
    if trouble == "too_small":
        fs = os.statvfs(shm.SEGMENT_DIR)
        shm.CAPACITY = fs.f_blocks * fs.f_frsize  # each slot as big as all of /dev/shm: the real ENOSPC, no mount
    elif dist.get_rank() == 1:
        shm.SEGMENT_DIR = other_dir
    logged = logging.handlers.BufferingHandler(capacity=1000)
    logged.setLevel(logging.WARNING)
    logging.getLogger("shardwise").addHandler(logged)
    try:
        troubled = run()
    finally:  # the trouble ends with this job: the next one of a shared launch has working shared memory
        shm.CAPACITY, shm.SEGMENT_DIR = capacity, segment_dir
        logging.getLogger("shardwise").removeHandler(logged)
    mine = dict(normal=normal, troubled=troubled, warnings=[r.getMessage() for r in logged.buffer])
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def batched_generate(layout: Layout, checkpoints: dict[str, str], prompts: list[list[int]], steps: int,
                     eos: dict[str, int], pad: int) -> dict:
    """Per checkpoint: masked logits of the left-padded batch, its greedy generation from the list of prompts
    and from the padded tensor plus mask, and each prompt generated alone."""
    from shardwise.model.forward import left_pad

    ids, mask = left_pad(prompts, pad)
    out = {}
    for name, path in checkpoints.items():
        with load_model(path, layout, progress=False) as model:
            settings = dict(eos_token_id=eos[name], pad_token_id=pad)
            out[name] = dict(
                logits=model(ids, attention_mask=mask),
                batched=model.generate(prompts, steps, **settings),
                from_tensor=model.generate(ids, steps, attention_mask=mask, **settings),
                alone=[model.generate(torch.tensor([p]), steps, **settings)[0] for p in prompts],
            )
    return out


def fail_with_an_echo_first() -> None:
    """Rank 1 reports a broken connection at once; rank 0, the real cause, a moment later."""
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")
    time.sleep(0.3)
    raise ValueError("the real cause, on rank 0")
