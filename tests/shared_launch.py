"""One launch per world size for many checks: spawning ranks (each importing torch) is the slow part of most tests.

A test module lists its jobs up front, each a module-level function with its arguments and the world size it
runs on; the first test that asks for a job's result launches every job of that world size at once, in order,
and later tests read theirs from the cache. A job that raises (on every rank alike) becomes a ``Failed`` value
that fails only the tests reading it, with its traceback, so one broken check does not fail its neighbours.
A one-rank world runs in the test process itself, unless the module asks for a launched rank.

The rank side (``run_jobs``) needs nothing but torch: importing this module in a rank stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

Job = tuple[Callable[..., Any], tuple]


@dataclass(frozen=True)
class Failed:
    """A job that raised on this rank, with its traceback: the test reading its result fails with it."""

    error: str


def everyone(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` outside a launch)."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _run(fn: Callable[..., Any], args: tuple) -> Any:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - handed to the test that reads this job
        return Failed(traceback.format_exc())


def run_jobs(jobs: list[Job]) -> list[list[Any]]:
    """In a rank: run the jobs in order; for each, every rank's value (a ``Failed`` where it raised). The values
    travel once, at the end: a gather per job would cost each job two more collectives of every rank."""
    mine = [_run(fn, args) for fn, args in jobs]
    return [list(values) for values in zip(*everyone(mine))] if jobs else []


def with_env(env: dict[str, str], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with ``env`` set in this rank's environment, as if the launch had been started with it."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn(*args)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def in_one_thread(fn: Callable[[], Any]) -> Any:
    """Run in this process as a launched rank on a busy machine would: one thread, since tiny ops split over
    cores that another process keeps busy wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


class SharedLaunches:
    """``result(key)`` is every rank's value of the job ``key``; jobs are ``{key: (world size, fn, args)}``.

    ``needs`` maps a world size to those whose launches must have run before it (its jobs read what they wrote);
    a failure there fails their own tests, and the jobs reading their outputs then fail by themselves. With
    ``local``, a one-rank world runs in this process instead of a launched rank.
    """

    def __init__(self, jobs: dict[Hashable, tuple[int, Callable[..., Any], tuple]], timeout: float = 600,
                 needs: dict[int, tuple[int, ...]] | None = None, local: bool = True):
        self.jobs = jobs
        self.timeout = timeout
        self.needs = needs or {}
        self.local = local
        self.results: dict[Hashable, list[Any]] = {}
        self.failed: dict[int, BaseException] = {}
        self.launched: set[int] = set()

    def launch(self, world: int) -> None:
        """Launch every job of ``world`` ranks, once (after the worlds it needs)."""
        from shardwise import launch

        if world in self.failed:
            raise RuntimeError(f"the {world}-rank launch failed") from self.failed[world]
        if world in self.launched:
            return
        for before in self.needs.get(world, ()):
            with contextlib.suppress(Exception):  # reported by the tests of that world
                self.launch(before)
        keys = [key for key, (size, _, _) in self.jobs.items() if size == world]
        jobs = [self.jobs[key][1:] for key in keys]
        try:
            if world == 1 and self.local:
                values = in_one_thread(lambda: run_jobs(jobs))
            else:
                values = launch(run_jobs, world, jobs, timeout=self.timeout)
        except Exception as e:
            self.failed[world] = e  # once: every test of this world size says so, none relaunches
            raise
        self.results |= dict(zip(keys, values))
        self.launched.add(world)

    def result(self, key: Hashable) -> list[Any]:
        import pytest

        self.launch(self.jobs[key][0])
        values = self.results[key]
        failures = [f"rank {rank}:\n{v.error}" for rank, v in enumerate(values) if isinstance(v, Failed)]
        if failures:
            pytest.fail(f"job {key} raised:\n" + "\n".join(failures), pytrace=False)
        return values
