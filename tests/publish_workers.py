"""Functions the publishing tests run inside spawned ranks: fault injection and byte counting."""

from __future__ import annotations

import resource
import signal
import time

import torch.distributed as dist

from shardwise import Layout, export, load_weights, save_sharded


def _with_fault(step: str, victim: int, how: str):
    """A stand-in for publish._run_step that makes ``victim`` fail at ``step``, by exception or a full disk."""
    import shardwise.io.collective_write as cw

    real = cw._run_step

    def run(name, fn):
        if name != step or dist.get_rank() != victim:
            return real(name, fn)
        if how == "raise":
            return real(name, _raise)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
        try:
            return real(name, fn)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    return run


def _raise():
    raise RuntimeError(f"injected fault on rank {dist.get_rank()}")


def faults_at_every_step(src: str, out: str, cases: list[tuple[str, str, int, str]]) -> list[list]:
    """Run each (writer, step, victim, how) case against an existing checkpoint at ``out``; every rank's outcome."""
    import shardwise.io.collective_write as cw

    weights = load_weights(src, Layout(2, 1), progress=False)
    writers = {"export": lambda: export(weights, out, max_file_bytes=20_000, progress=False, overwrite=True),
               "save_sharded": lambda: save_sharded(weights, out, overwrite=True)}
    real, outcomes = cw._run_step, []
    for writer, step, victim, how in cases:
        cw._run_step = _with_fault(step, victim, how)
        t0 = time.monotonic()
        try:
            writers[writer]()
            error = None
        except cw.WriteError as e:
            error = str(e)
        finally:
            cw._run_step = real
        outcomes.append((time.monotonic() - t0, error))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, outcomes)
    return every


def bytes_written_by_export(src: str, out: str, tp: int) -> list[int]:
    """Each rank's count of data bytes it wrote during an HF export."""
    import shardwise.io.hf_export as ex

    write, written = ex._write_box, [0]

    def counting(path, fd, place, box, data):
        written[0] += box.numel * place.dtype.itemsize
        write(path, fd, place, box, data)

    ex._write_box = counting
    export(load_weights(src, Layout(tp, 1), progress=False), out, progress=False)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, written[0])
    return every
