"""Signals stop everything: SIGTERM or SIGINT to `shardwise export`/`reshard`, or SIGKILL, leaves no rank running.

Each job runs the real CLI in a driver process whose ranks pause right after their
first write, so the signal always lands mid-job. Orphaned ranks would finish that job
and publish the checkpoint a few seconds later; so after the signal every process of
the job must be gone within seconds, and nothing may appear for a while after that.
All jobs run at once: they spend most of their time waiting.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from workers import fail_on_rank, reshard_all

from shardwise import launch
from shardwise.launch import LaunchInterrupted

PAUSE = 6.0  # seconds each rank pauses after its first write: longer than the test takes to stop it
GONE_WITHIN = 5.0  # seconds after the signal by which every process of the job must have ended
WATCH = 10.0  # seconds after the signal during which nothing may be published

DRIVER = """
import functools, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground job, whoever started us
signal.signal(signal.SIGTERM, signal.SIG_DFL)
sys.path.insert(0, {tests!r})
import test_signals
from shardwise import cli
cli.{rank_fn} = functools.partial(test_signals.pausing, {rank_fn!r}, {marks!r})
cli.main({argv!r})
"""


def pausing(rank_fn: str, marks: str, *args):
    """In a rank: the CLI's own ``rank_fn``, pausing after this rank's first write (marked by a file, its pid)."""
    from shardwise import cli, hf_export, sharded

    for module, name in ((sharded, "save_safetensors"), (hf_export, "_write_box")):
        setattr(module, name, _pause_after_first(getattr(module, name), Path(marks)))
    return getattr(cli, rank_fn)(*args)


def _pause_after_first(write: Callable, marks: Path) -> Callable:
    paused = False

    def write_then_pause(*args, **kwargs):
        nonlocal paused
        write(*args, **kwargs)
        if not paused:
            paused = True
            (marks / str(os.getpid())).touch()
            time.sleep(PAUSE)

    return write_then_pause


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ..., start time at [19]); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


@dataclass(frozen=True)
class Proc:
    """A process by pid and start time, so that a reused pid is never mistaken for it."""

    pid: int
    start: str

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[19] == self.start and stat[0] not in "ZX"


def family(root: int) -> set[Proc]:
    """``root`` and all its descendants (ranks, multiprocessing's resource tracker): taken while they are linked."""
    stats = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found.add(Proc(pid, stats[pid][19]))
            todo += [child for child, s in stats.items() if int(s[1]) == pid]
    return found


def published(out: Path) -> list[Path]:
    """``out``, or any directory beside it that a reader would take for a checkpoint (an index or a manifest)."""
    return [d for d in out.parent.iterdir() if d == out or any(
        (d / f).exists() for f in ("model.safetensors.index.json", "shardwise.json"))]


def wait_until(done: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)
    return done()


@dataclass
class Outcome:
    returncode: int
    stderr: str
    survivors: set[Proc]  # processes of the job still alive GONE_WITHIN seconds after the signal
    published: list[Path]  # checkpoints that appeared within WATCH seconds of the signal


def run_stopped(work: Path, argv: list[str], rank_fn: str, world: int, sig: signal.Signals,
                to_group: bool) -> Outcome:
    """Run the CLI until all ``world`` ranks are mid-write, send ``sig`` (to the process group, as a terminal's
    Ctrl-C does, if ``to_group``), and report what is left of the job."""
    marks, out = work / "marks", work / "out" / "ckpt"
    marks.mkdir(parents=True)
    out.parent.mkdir()
    driver = DRIVER.format(tests=str(Path(__file__).parent), rank_fn=rank_fn, marks=str(marks), argv=[*argv, str(out)])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RUN_ID")}
    with open(work / "stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True)
        job: set[Proc] = set()
        try:
            wait_until(lambda: len(list(marks.iterdir())) == world or proc.poll() is not None, 180)
            job = family(proc.pid)
            writing = {int(m.name) for m in marks.iterdir()}
            assert proc.poll() is None and len(writing) == world and writing <= {p.pid for p in job}, \
                f"the job did not get to writing:\n{Path(err.name).read_text()}"
            (os.killpg if to_group else os.kill)(proc.pid, sig)
            signalled = time.monotonic()
            wait_until(lambda: proc.poll() is not None and not any(p.alive() for p in job), GONE_WITHIN)
            survivors = {p for p in job if p.alive()}
            time.sleep(max(0.0, signalled + WATCH - time.monotonic()))
            err.seek(0)
            return Outcome(proc.wait(), err.read(), survivors, published(out))
        finally:
            for p in job:
                if p.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def stopped(checkpoints, tmp_path_factory) -> Iterator[dict[str, Future[Outcome]]]:
    root = tmp_path_factory.mktemp("signals")
    hf = str(checkpoints["llama-untied"])
    sharded = str(root / "sharded-tp2")
    with ThreadPoolExecutor(4) as pool:
        def start(name: str, *job) -> Future[Outcome]:
            return pool.submit(run_stopped, root / name, *job)

        jobs = {
            "reshard-SIGTERM": start("reshard-SIGTERM", ["reshard", "--tp", "3", "--pp", "2", hf], "write_rank", 6,
                                     signal.SIGTERM, False),
            "reshard-SIGINT": start("reshard-SIGINT", ["reshard", "--tp", "2", hf], "write_rank", 2, signal.SIGINT,
                                    True),
        }
        launch(reshard_all, 2, {"m": hf}, {"m": sharded}, 2, 1, timeout=300)  # for the exports, while those start
        for sig in (signal.SIGTERM, signal.SIGKILL):
            jobs[f"export-{sig.name}"] = start(f"export-{sig.name}", ["export", sharded], "write_rank", 2, sig, False)
        yield jobs


@pytest.mark.parametrize("job", ["export-SIGTERM", "reshard-SIGTERM", "reshard-SIGINT"])
def test_stop_signal_stops_every_rank_with_one_line(stopped, job):
    sig = signal.Signals[job.split("-")[1]]
    outcome = stopped[job].result()
    assert not outcome.survivors, f"still running {GONE_WITHIN:.0f}s after {sig.name}: {outcome.survivors}"
    assert not outcome.published, f"published after {sig.name}: {outcome.published}"
    for noise in ("Traceback", "resource_tracker", "leaked"):
        assert noise not in outcome.stderr, outcome.stderr
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and sig.name in lines[0], outcome.stderr
    assert outcome.returncode == 128 + sig, outcome.stderr


def test_killed_parent_takes_its_ranks_with_it(stopped):
    outcome = stopped["export-SIGKILL"].result()
    assert outcome.returncode == -signal.SIGKILL
    assert not outcome.survivors, f"ranks outlived their killed parent by {GONE_WITHIN:.0f}s: {outcome.survivors}"
    assert not outcome.published, f"published after the parent was killed: {outcome.published}"


def test_launch_raises_launch_interrupted_and_restores_handlers():
    """In-process: SIGTERM during a launch that would never finish raises, stops the ranks, and leaves the caller's
    handler as it was (never called: the signal was the launch's to handle)."""
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    mine = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        started = time.monotonic()
        timer.start()
        with pytest.raises(LaunchInterrupted, match="SIGTERM") as info:
            launch(fail_on_rank, 2, 1, "stall", timeout=30)
        assert info.value.signum == signal.SIGTERM and time.monotonic() - started < 15
        assert not mp.active_children()
        assert signal.getsignal(signal.SIGTERM) is mine and not calls
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
