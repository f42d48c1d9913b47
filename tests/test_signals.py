"""Signals stop everything: SIGTERM or SIGINT to `shardwise export`/`reshard`, or SIGKILL, leaves no rank running,
whether the ranks were spawned or forked from a forkserver.

Each job runs the real CLI in a driver process whose ranks pause right after their
first write, so the signal always lands mid-job. Orphaned ranks would finish that job
and publish the checkpoint a few seconds later; so after the signal every process of
the job must be gone within seconds, and nothing may appear for a while after that.
A launcher that outlives its ranks (SIGTERM, SIGINT, a rank SIGKILLed as the OOM killer
would) removes the temporary directory of the write they did not finish, and says so.
All jobs run at once: they spend most of their time waiting.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import re
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
from shardwise.io.publish import TMP_PREFIX
from shardwise.launch import START_METHOD_ENV, LaunchInterrupted

PAUSE = 6.0  # seconds each rank pauses after its first write: longer than the test takes to stop it
GONE_WITHIN = 5.0  # seconds after the signal by which every process of the job must have ended
WATCH = 10.0  # seconds after the signal during which nothing may be published

DRIVER = """
import functools, importlib, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground job, whoever started us
signal.signal(signal.SIGTERM, signal.SIG_DFL)
sys.path.insert(0, {tests!r})
import test_signals
from shardwise import cli
setattr(importlib.import_module({module!r}), {fn!r}, functools.partial(test_signals.pausing, {rank_fn!r}, {marks!r}))
cli.main({argv!r})
"""


def pausing(rank_fn: str, marks: str, *args):
    """In a rank: the CLI's own ``rank_fn`` (module.function), pausing after this rank's first write (marked by a
    file, its pid)."""
    from shardwise.io import hf_export, sharded

    for module, name in ((sharded, "save_safetensors"), (hf_export, "_write_box")):
        setattr(module, name, _pause_after_first(getattr(module, name), Path(marks)))
    module, fn = rank_fn.rsplit(".", 1)
    return getattr(importlib.import_module(module), fn)(*args)


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


def temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{TMP_PREFIX}*"))


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
    left: list[Path]  # temporary directories beside the target, WATCH seconds after the signal
    temps: list[Path]  # the temporary directories there when the signal was sent


def run_stopped(work: Path, argv: list[str], rank_fn: str, world: int, sig: signal.Signals, to: str,
                start: str = "spawn") -> Outcome:
    """Run the CLI, its ranks started as ``start`` says (spawned, or forked from a forkserver), until all ``world``
    ranks are mid-write in its ``rank_fn`` (module.function), send ``sig`` to the launching process, to its process
    group (as a terminal's Ctrl-C does) or to one rank, as ``to`` says, and report what is left of the job."""
    marks, out = work / "marks", work / "out" / "ckpt"
    marks.mkdir(parents=True)
    out.parent.mkdir()
    module, fn = rank_fn.rsplit(".", 1)
    driver = DRIVER.format(tests=str(Path(__file__).parent), module=module, fn=fn, rank_fn=rank_fn, marks=str(marks),
                           argv=[*argv, str(out)])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RUN_ID")}
    env[START_METHOD_ENV] = start
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
            temps = temporaries(out)
            {"launcher": os.kill, "group": os.killpg, "rank": lambda _, s: os.kill(min(writing), s)}[to](proc.pid, sig)
            signalled = time.monotonic()
            wait_until(lambda: proc.poll() is not None and not any(p.alive() for p in job), GONE_WITHIN)
            survivors = {p for p in job if p.alive()}
            time.sleep(max(0.0, signalled + WATCH - time.monotonic()))
            err.seek(0)
            return Outcome(proc.wait(), err.read(), survivors, published(out), temporaries(out), temps)
        finally:
            for p in job:
                if p.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


WRITE_RANK, TRAIN_RANK = "shardwise.cli.checkpoints.write_rank", "shardwise.train.run.train_rank"


@pytest.fixture(scope="module")
def stopped(checkpoints, tmp_path_factory) -> Iterator[dict[str, Future[Outcome]]]:
    from test_train_cli import _with_tokenizer

    root = tmp_path_factory.mktemp("signals")
    hf = str(checkpoints["llama-untied"])
    sharded = str(root / "sharded-tp2")
    tokenized = str(_with_tokenizer(checkpoints["qwen2-untied"], root / "tokenized"))
    (root / "d.txt").write_text(" ".join(f"t{i}" for i in range(1, 40)))
    with ThreadPoolExecutor(6) as pool:
        def start(name: str, *job) -> Future[Outcome]:
            return pool.submit(run_stopped, root / name, *job)

        jobs = {
            "reshard-SIGTERM": start("reshard-SIGTERM", ["reshard", "--tp", "3", "--pp", "2", hf], WRITE_RANK, 6,
                                     signal.SIGTERM, "launcher"),
            "reshard-SIGINT": start("reshard-SIGINT", ["reshard", "--tp", "2", hf], WRITE_RANK, 2, signal.SIGINT,
                                    "group", "forkserver"),
            "train-rank-SIGKILL": start("train-rank-SIGKILL", ["train", tokenized, "--data", str(root / "d.txt"),
                                                               "--steps", "3", "--dp", "2", "--batch", "2", "--seq",
                                                               "8", "--save-every", "1", "--save"], TRAIN_RANK, 2,
                                        signal.SIGKILL, "rank"),
        }
        launch(reshard_all, 2, {"m": hf}, {"m": sharded}, 2, 1, timeout=300)  # for the exports, while those start
        for name, sig, how in (("export-SIGTERM", signal.SIGTERM, "forkserver"), ("export-SIGKILL", signal.SIGKILL,
                                "spawn"), ("export-SIGKILL-forkserver", signal.SIGKILL, "forkserver")):
            jobs[name] = start(name, ["export", sharded], WRITE_RANK, 2, sig, "launcher", how)
        yield jobs


def _removal_said(outcome: Outcome) -> None:
    """The write's temporary directory was there when the signal came; the launcher removed it, saying so."""
    assert len(outcome.temps) == 1, outcome.temps
    assert not outcome.left, f"left beside the target: {outcome.left}"
    assert f"shardwise.launch: removed {outcome.temps[0]}, left by an interrupted write (pid " in outcome.stderr, \
        outcome.stderr


@pytest.mark.parametrize("job", ["export-SIGTERM", "reshard-SIGTERM", "reshard-SIGINT"])
def test_stop_signal_stops_every_rank_with_one_line(stopped, job):
    sig = signal.Signals[job.split("-")[1]]
    outcome = stopped[job].result()
    assert not outcome.survivors, f"still running {GONE_WITHIN:.0f}s after {sig.name}: {outcome.survivors}"
    assert not outcome.published, f"published after {sig.name}: {outcome.published}"
    for noise in ("Traceback", "resource_tracker", "leaked"):
        assert noise not in outcome.stderr, outcome.stderr
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("shardwise:")]
    assert errors == [f"shardwise: interrupted by {sig.name}; all ranks were stopped"], outcome.stderr
    assert outcome.returncode == 128 + sig, outcome.stderr
    _removal_said(outcome)


def test_a_rank_killed_during_a_training_save_leaves_nothing_behind(stopped):
    """The OOM killer's way: one rank SIGKILLed mid-save; the launcher stops the other and removes the save's
    temporary directory before it exits, with one line of error naming the rank."""
    outcome = stopped["train-rank-SIGKILL"].result()
    assert not outcome.survivors and not outcome.published, outcome
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("shardwise:")]
    assert len(errors) == 1 and re.fullmatch(r"shardwise: rank \d died with exit code -9", errors[0]), outcome.stderr
    assert "Traceback" not in outcome.stderr and outcome.returncode == 1, outcome.stderr
    _removal_said(outcome)


@pytest.mark.parametrize("job", ["export-SIGKILL", "export-SIGKILL-forkserver"])
def test_killed_parent_takes_its_ranks_with_it(stopped, job):
    """Spawned ranks die with their parent (the kernel's parent-death signal); forked ones watch their launcher."""
    outcome = stopped[job].result()
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
