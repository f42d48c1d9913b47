"""Run a function on N local ranks with torch.distributed initialized, or join a torchrun world.

The parent watches its children instead of joining them blindly: a rank that raises,
dies or stalls ends the whole launch with an error that names it, and the other ranks
(likely blocked in a collective waiting for it) are terminated. Nothing hangs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 1800.0


class RankError(RuntimeError):
    """A rank failed; ``rank`` says which, the message carries its traceback, ``__cause__`` its exception."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


class LaunchTimeout(TimeoutError):
    """Some rank neither finished nor failed in time."""


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(world_size: int) -> str:
    """gloo, plus NCCL for CUDA tensors when every rank can have a GPU: collectives follow the tensor's device."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _init(backend: str | None, rank: int, world_size: int, timeout: float) -> None:
    backend = backend or default_backend(world_size)
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))


def _worker(rank: int, world_size: int, port: int, backend: str | None, timeout: float,
            fn: Callable, args: tuple, results: mp.Queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      SHARDWISE_TIMEOUT=str(timeout))
    # Ranks share the machine's cores; oversubscribing threads makes every rank slower.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        _init(backend, rank, world_size, timeout)
        value = fn(*args)
        results.put((rank, True, _dumps(value) if rank == 0 else None))
    except BaseException as e:  # noqa: BLE001 - everything must reach the parent
        try:
            exc = pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an unpicklable exception still reports its traceback
            exc = None
        results.put((rank, False, (traceback.format_exc(), exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _run_joined(fn: Callable, world_size: int, args: tuple, backend: str | None, timeout: float) -> Any:
    """Inside torchrun: this process is one rank; run here and share rank 0's value with every rank."""
    world = int(os.environ["WORLD_SIZE"])
    if world != world_size:
        raise ValueError(f"launch asked for {world_size} ranks but torchrun started {world}")
    owned = not dist.is_initialized()
    if owned:
        _init(backend, int(os.environ["RANK"]), world, timeout)
    try:
        value = [fn(*args)]
        dist.broadcast_object_list(value, src=0)
    finally:
        if owned:  # a group left to interpreter shutdown can abort the process
            dist.destroy_process_group()
    return value[0]


def _stop(procs: list[mp.Process], grace: float = 0.0) -> None:
    """Join ranks, terminating those still alive after ``grace`` seconds (then killing after 5 more)."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _failure(procs: list[mp.Process], results: mp.Queue, done: set[int], first: tuple | None) -> RankError:
    """Pick the root cause: a rank that died outright beats the peers that then failed talking to it."""
    errors = [first] if first else []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            rank, ok, payload = results.get(timeout=0.1)
        except queue.Empty:
            continue
        if ok:
            done.add(rank)
        else:
            errors.append((rank, payload))
    reported = done | {r for r, _ in errors}
    for rank, p in enumerate(procs):
        if rank not in reported and p.exitcode not in (None, 0):
            return RankError(rank, f"rank {rank} died with exit code {p.exitcode}")
    rank, (tb, exc) = errors[0]
    err = RankError(rank, f"rank {rank} failed:\n{tb}")
    if exc is not None:
        with contextlib.suppress(Exception):  # the traceback text already says what happened
            err.__cause__ = pickle.loads(exc)
    return err


def launch(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT,
           backend: str | None = None) -> Any:
    """Run ``fn(*args)`` on ``world_size`` ranks and return rank 0's value.

    ``fn`` must be importable (a module-level function), since ranks are spawned.
    Under torchrun, ``fn`` runs in the current process as its rank instead.
    ``timeout`` bounds both each collective and the whole launch.
    """
    if in_torchrun():
        return _run_joined(fn, world_size, args, backend, timeout)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: set[int] = set()
    value = None
    deadline = time.monotonic() + timeout
    grace = 0.0
    try:
        while len(done) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                rank, ok, payload = None, True, None
            if rank is None:
                if any(p.exitcode not in (None, 0) for r, p in enumerate(procs) if r not in done):
                    raise _failure(procs, results, done, None)
                if time.monotonic() > deadline:
                    stuck = [r for r in range(world_size) if r not in done]
                    raise LaunchTimeout(f"ranks {stuck} did not finish within {timeout:.0f}s")
                continue
            if not ok:
                raise _failure(procs, results, done, (rank, payload))
            done.add(rank)
            if rank == 0:
                value = _loads(payload)
        grace = 30.0  # every rank succeeded: let them exit cleanly
    finally:
        _stop(procs, grace)
        results.close()
        results.join_thread()
    return value
