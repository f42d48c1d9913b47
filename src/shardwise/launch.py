"""Run a function on N local ranks with torch.distributed initialized, or join a torchrun world.

The parent watches its children instead of joining them blindly: a rank that raises,
dies or stalls ends the whole launch with an error that names it, and the other ranks
(likely blocked in a collective waiting for it) are terminated. Nothing hangs.

Ranks never outlive the launch. SIGINT or SIGTERM to the parent (Ctrl-C, a job
scheduler, ``docker stop``) terminates every rank and raises ``LaunchInterrupted``; a
parent that dies outright, even by SIGKILL, takes its ranks with it. Otherwise orphaned
ranks would finish the job and publish a checkpoint that nobody is waiting for.

A rank stopped in the middle of a write leaves its temporary directory (possibly many
GB, hidden beside the target). Its ranks note each one in the launch's journal, and once
they are all stopped the parent removes those left behind, saying which.

Ranks are spawned: each is a new Python that imports torch, about 1.5 s of CPU. A process
that launches many short jobs (a test suite, a notebook) can set
``SHARDWISE_START_METHOD=forkserver``: a server process imports torch and shardwise once, at
the first launch, and forks every later rank from that, ready in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import logging
import multiprocessing as mp
import os
import pickle
import queue
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .io.publish import JOURNAL_ENV, remove_orphans
from .words import listed, plural

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 1800.0
EXIT_GRACE = 30.0  # seconds ranks that all succeeded get to exit on their own
KILL_AFTER = 5.0  # seconds between terminating a rank and killing it
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1
START_METHOD_ENV = "SHARDWISE_START_METHOD"
START_METHODS = ("spawn", "forkserver")
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "shardwise"]
UNGUARDED_EXIT = 87  # a rank whose start re-ran a launch() at the top level of the main script


class RankError(RuntimeError):
    """A rank failed; ``rank`` says which, the message carries its traceback, ``__cause__`` its exception."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


class LaunchTimeout(TimeoutError):
    """Some rank neither finished nor failed in time."""


class LaunchInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (``signum``) reached the launching process; every rank has been stopped.

    A KeyboardInterrupt rather than an Exception: a request to stop must get past the
    ``except Exception`` of callers' retry loops, and code that already handles Ctrl-C
    around ``launch`` (as a plain KeyboardInterrupt used to arrive) keeps working.
    """

    def __init__(self, signum: int):
        self.signum = signal.Signals(signum)
        super().__init__(f"interrupted by {self.signum.name}; all ranks were stopped")


class _StopSignals:
    """While ranks run, SIGINT and SIGTERM are noted; leaving the block then raises ``LaunchInterrupted``.

    The handler only notes the signal, and the launch loop acts on it: an exception
    raised from a handler could land inside the very cleanup that stops the ranks.
    A signal is never swallowed, even one arriving after every rank succeeded, since it
    may be meant for the caller's work after the launch too. Python runs handlers in the
    main thread only, so elsewhere nothing is installed; nor over a signal the caller
    ignores (a shell starts background jobs with SIGINT ignored).
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.received = self.received or signal.Signals(signum)

    def noted(self) -> bool:
        return self.received is not None

    def check(self) -> None:
        if self.received is not None:
            raise LaunchInterrupted(self.received)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if not isinstance(exc, LaunchInterrupted):
            self.check()


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


def _context() -> mp.context.BaseContext:
    """How ranks start: spawned (the default), or forked from a server that imported torch once."""
    method = os.environ.get(START_METHOD_ENV) or "spawn"  # set but empty: the default, as if unset
    if method not in START_METHODS:
        raise ValueError(f"{START_METHOD_ENV}={method!r}: expected one of {', '.join(START_METHODS)}")
    ctx = mp.get_context(method)
    if method == "forkserver":
        try:  # what forked ranks watch their launcher with
            os.close(os.pidfd_open(os.getpid()))
        except (AttributeError, OSError) as e:
            raise ValueError(f"{START_METHOD_ENV}=forkserver needs Linux 5.3 or later (pidfd_open: {e})") from None
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # read when the server starts, at the first launch
    return ctx


def _parent_of(pid: int) -> int | None:
    """The parent of process ``pid`` as /proc tells; None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _exit_when_gone(pidfd: int) -> None:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.poll()
    os._exit(1)


def _watch_launcher(launcher: int) -> None:
    """Exit when the launcher exits, through a pidfd opened before checking that the launcher is still the
    forkserver's parent: a pid reused after its death is never watched."""
    try:
        pidfd = os.pidfd_open(launcher)
    except ProcessLookupError:
        os._exit(1)
    if _parent_of(os.getppid()) != launcher:
        os._exit(1)
    threading.Thread(target=_exit_when_gone, args=(pidfd,), name="watch-launcher", daemon=True).start()


def _die_with_launcher(launcher: int, forked: bool) -> None:
    """Have this rank end when its launcher ends, however it ends.

    Every rank asks the kernel to kill it when its parent dies: a spawned rank's parent is
    the launcher, a forked rank's the forkserver (a server killed under it takes it along).
    The forkserver outlives the launcher for as long as any rank holds its pipe open, ranks
    included, so a forked rank also watches the launcher itself. Either may have died before
    this ran (a spawned rank imports torch first, which takes seconds): then the rank has
    been reparented and exits at once. Without prctl (not Linux), a thread polls for the
    same reparenting.
    """
    parent = os.getppid()
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None or prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
        threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    if forked:
        _watch_launcher(launcher)
    elif os.getppid() != launcher:
        os._exit(1)


def _quiet_signals() -> None:
    """Make SIGTERM and SIGINT end this rank at once and silently, as the kernel does by default.

    SIGTERM is how the parent stops a rank; SIGINT comes from Ctrl-C, which a terminal
    sends to its whole process group. Python would print a KeyboardInterrupt traceback
    per rank, and runs its handlers only between bytecodes, never while a rank waits in
    a gloo collective. SIGINT has been blocked since the rank started (see ``_start``);
    one already pending lands now. A SIGINT the caller ignores stays ignored.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _untracked_progress_lock() -> None:
    """Give tqdm a thread lock in this rank instead of its default multiprocessing semaphore.

    That semaphore is registered with the parent's resource tracker, which warns of a
    "leaked semaphore" for every rank that is terminated; a rank's bars are only ever
    drawn by its own threads.
    """
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity (taskset, a container's cpuset) where the OS tells."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _warn_if_oversubscribed(world_size: int) -> None:
    cores = usable_cores()
    if world_size > cores:
        log.warning("%s on %s: the ranks take turns on the cores and every collective waits for the ranks that are "
                    "not running, so this runs slower than with at most %d ranks, and each rank adds the memory of "
                    "its own Python and torch", plural(world_size, "rank"), plural(cores, "CPU core"), cores)


def _worker(rank: int, world_size: int, port: int, backend: str | None, timeout: float,
            fn: Callable, args: tuple | bytes, results: mp.Queue, launcher: int, env: dict[str, str] | None,
            journal: str) -> None:
    """One rank. A forked rank gets its arguments packed, and the launcher's environment (it would otherwise have
    the forkserver's, from the first launch); a spawned one has both already."""
    forked = env is not None
    _die_with_launcher(launcher, forked)
    _quiet_signals()
    _untracked_progress_lock()
    if forked:
        os.environ.clear()
        os.environ.update(env)
        args = _loads(args)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      SHARDWISE_TIMEOUT=str(timeout), **{JOURNAL_ENV: journal})
    # Ranks share the machine's cores; oversubscribing threads makes every rank slower.
    torch.set_num_threads(max(1, usable_cores() // world_size))
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
        # The rank is about to exit, and Python's exit runs the cycle collector over every object left, torch's
        # whole module graph included: ~0.3 s of CPU per rank, which the launch (waiting for its ranks to exit)
        # and the other ranks sharing the cores pay for. The OS frees the memory anyway: let the exit skip them.
        gc.freeze()


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _run_joined(fn: Callable, world_size: int, args: tuple, backend: str | None, timeout: float) -> Any:
    """Inside torchrun: this process is one rank; run here and share rank 0's value with every rank."""
    world = int(os.environ["WORLD_SIZE"])
    if world != world_size:
        raise ValueError(f"launch asked for {plural(world_size, 'rank')} but torchrun started {world}")
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


def _start(procs: list[mp.Process]) -> None:
    """Start ranks with SIGINT blocked, a mask they inherit (as does a forkserver started by the first launch, and
    the ranks it forks).

    A Ctrl-C while they still import torch then waits until ``_quiet_signals`` has made
    it silent, instead of printing a KeyboardInterrupt traceback from every rank. In
    this process the signal is only delayed until the ranks are started, never lost.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with _no_phantom_main():
            for p in procs:
                p.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def _no_phantom_main():
    """Hide a main script that is not a file (``python -`` names it '<stdin>') while ranks start.

    Spawned ranks re-run the main script by its path; with none to find they would die
    before running a function that does not even live there.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    phantom = path is not None and not os.path.isfile(path)
    if phantom:
        del main.__file__
    try:
        yield
    finally:
        if phantom:
            main.__file__ = path


def _wait(procs: list[mp.Process], seconds: float, cut_short: Callable[[], bool] = lambda: False) -> None:
    """Wait up to ``seconds`` for ranks to exit, in short steps so that ``cut_short()`` can end the wait."""
    deadline = time.monotonic() + seconds
    while (alive := [p.sentinel for p in procs if p.is_alive()]) and not cut_short():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        wait(alive, timeout=min(left, 0.2))


def _stop(procs: list[mp.Process]) -> None:
    """Terminate the ranks still alive, and kill those still alive ``KILL_AFTER`` seconds later."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    _wait(procs, KILL_AFTER)
    for p in procs:
        if p.is_alive():
            p.kill()
        if p.pid is not None:
            p.join()


ECHOES = ("DistBackendError", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _is_echo(traceback_text: str) -> bool:
    """Whether a rank's error is only its collective breaking because a peer failed first: never the cause."""
    lines = traceback_text.strip().splitlines()
    return bool(lines) and any(echo in lines[-1] for echo in ECHOES)  # the exception itself, not its context


def _failure(procs: list[mp.Process], results: mp.Queue, done: set[int], first: tuple | None) -> RankError:
    """Pick the root cause: a rank that died outright, else the lowest rank whose error is its own, not an echo."""
    errors = [first] if first else []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        exited = all(p.exitcode is not None for p in procs)  # before reading: all they reported is in the queue
        try:
            rank, ok, payload = results.get(timeout=0.1)
        except queue.Empty:
            if exited:
                break
            continue
        if ok:
            done.add(rank)
        else:
            errors.append((rank, payload))
    reported = done | {r for r, _ in errors}
    for rank, p in enumerate(procs):
        if p.exitcode == UNGUARDED_EXIT:
            return RankError(rank, "launch() runs again in every rank as it starts: call it under "
                                   "`if __name__ == \"__main__\":` in your script")
        if rank not in reported and p.exitcode not in (None, 0):
            return RankError(rank, f"rank {rank} died with exit code {p.exitcode}")
    rank, (tb, exc) = min(errors, key=lambda e: (_is_echo(e[1][0]), e[0]))
    err = RankError(rank, f"rank {rank} failed:\n{tb}")
    if exc is not None:
        with contextlib.suppress(Exception):  # the traceback text already says what happened
            err.__cause__ = pickle.loads(exc)
    return err


def _supervise(procs: list[mp.Process], results: mp.Queue, timeout: float, stop: _StopSignals) -> Any:
    """Rank 0's value once every rank has reported success; the first failure, stall or stop signal raises."""
    world_size = len(procs)
    done: set[int] = set()
    value = None
    deadline = time.monotonic() + timeout
    while len(done) < world_size:
        try:
            report = results.get(timeout=0.2)
        except queue.Empty:
            report = None
        stop.check()  # first: ranks killed by the same Ctrl-C would otherwise pass for failed ones
        if report is None:
            if any(p.exitcode not in (None, 0) for r, p in enumerate(procs) if r not in done):
                raise _failure(procs, results, done, None)
            if time.monotonic() > deadline:
                stuck = [r for r in range(world_size) if r not in done]
                raise LaunchTimeout(f"{listed('rank', stuck)} did not finish within {timeout:.0f}s")
            continue
        rank, ok, payload = report
        if not ok:
            raise _failure(procs, results, done, (rank, payload))
        done.add(rank)
        if rank == 0:
            value = _loads(payload)
    return value


def _check_spawnable(fn: Callable) -> None:
    """Refuse, in one line that says what to change, a launch whose ranks could never find ``fn``.

    Ranks are new processes: they import ``fn`` by name, and re-run the main script to
    find functions defined there. A script without a ``__main__`` guard therefore calls
    ``launch`` again in every rank (which then exits quietly with ``UNGUARDED_EXIT``), and
    a function typed into ``python -c``, stdin or a notebook has no file to be found in.
    """
    if getattr(mp.current_process(), "_inheriting", False):
        os._exit(UNGUARDED_EXIT)  # a rank starting up; the launching process explains
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and not os.path.isfile(getattr(main, "__file__", None) or ""):
        raise ValueError(f"launch: {getattr(fn, '__name__', fn)!r} is defined interactively (python -c, stdin or "
                         "a notebook), where the spawned ranks cannot import it; define it in a .py file and import it")
    try:
        pickle.dumps(fn)
    except Exception as e:  # noqa: BLE001 - any pickling failure means the ranks could not receive fn
        raise ValueError(f"launch: {fn!r} cannot be sent to the ranks ({e}); pass a module-level function") from None


def _remove_orphans(journal: Path) -> None:
    """Once every rank is stopped (so the writers are provably gone): remove the temporary directories of the
    writes they did not finish, and say so."""
    for done in remove_orphans(journal):
        log.warning("%s", done)
    journal.unlink(missing_ok=True)


def launch(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT,
           backend: str | None = None) -> Any:
    """Run ``fn(*args)`` on ``world_size`` ranks and return rank 0's value.

    ``fn`` must be importable (a module-level function): ranks import it by name.
    Under torchrun, ``fn`` runs in the current process as its rank instead.
    ``timeout`` bounds both each collective and the whole launch. SIGINT or SIGTERM
    stops every rank and raises ``LaunchInterrupted``. Temporary directories of writes
    that stopped ranks left unfinished are removed before this returns or raises.
    """
    if in_torchrun():
        return _run_joined(fn, world_size, args, backend, timeout)
    _check_spawnable(fn)
    _warn_if_oversubscribed(world_size)
    ctx = _context()
    forked = ctx.get_start_method() == "forkserver"
    # A forked rank's arguments travel as bytes: pickled for a process, each tensor would take a file descriptor to
    # share its storage, and a forkserver passes a new rank fewer than 256. Its environment is the launcher's now.
    sent, env = (_dumps(args), dict(os.environ)) if forked else (args, None)
    results = ctx.Queue()
    port = _free_port()
    fd, journal = tempfile.mkstemp(prefix="shardwise-launch-", suffix=".temps")
    os.close(fd)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout, fn, sent, results,
                                               os.getpid(), env, journal)) for r in range(world_size)]
    with _StopSignals() as stop:
        try:
            _start(procs)
            value = _supervise(procs, results, timeout, stop)
            _wait(procs, EXIT_GRACE, stop.noted)  # every rank succeeded: let them exit cleanly
        finally:
            _stop(procs)
            results.close()
            results.join_thread()
            _remove_orphans(Path(journal))
    return value
