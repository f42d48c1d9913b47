"""Progress for long work: a bar where a person is watching, plain lines where a log file is.

On a terminal a bar redraws in place; in a log file or CI output every redraw would
be a line of carriage-return debris. So the bar is drawn only on a terminal, and
either way a finished stage says so in one line (what it did, in how long). Training
steps, which can run for days, get a line every few steps instead, as HF's Trainer
writes to its log file: where it stands, and when it will be done.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

from .words import plural

T = TypeVar("T")
EVERY_STEPS = 10  # a training line every this many steps...
EVERY_SECONDS = 30.0  # ...and at least this often


def _say(line: str) -> None:
    print(f"[shardwise] {line}", file=sys.stderr, flush=True)


def _on_terminal(enabled: bool) -> bool:
    return enabled and sys.stderr.isatty()


def progress_bar(items: Iterable[T], enabled: bool = True, desc: str = "", unit: str = "item",
                 total: int | None = None) -> Iterator[T]:
    """``items``, with a tqdm bar on stderr when ``enabled`` and stderr is a terminal; when ``enabled``, one line
    once they are all done: ``[shardwise] DESC N UNITs in S s``."""
    start, n = time.monotonic(), 0
    for item in tqdm(items, disable=not _on_terminal(enabled), leave=False, desc=desc, unit=unit, total=total):
        n += 1
        yield item
    if enabled:
        _say(f"{desc} {plural(n, unit)} in {time.monotonic() - start:.2f}s")


def stage(desc: str, run: Callable[..., T], *args) -> T:
    """``run(*args)``, a long stage of work (a benchmark's setting), said in one line once done, as a log file needs:
    ``[shardwise] DESC in S s``."""
    start = time.monotonic()
    out = run(*args)
    _say(f"{desc} in {time.monotonic() - start:.2f}s")
    return out


class StepProgress:
    """Training steps ``first..last``: a bar on a terminal; elsewhere a line every ``EVERY_STEPS`` steps (counted
    from step 0, so a resumed run keeps the same rhythm), at least every ``EVERY_SECONDS`` and at the last step."""

    def __init__(self, enabled: bool, first: int, last: int):
        self.first, self.last = first, last
        self.lines = enabled and not _on_terminal(enabled)
        self.bar = tqdm(disable=not _on_terminal(enabled), leave=False, total=last - first + 1, desc="training",
                        unit="step")
        self.start = self.shown = time.monotonic()

    def update(self, step: int, fields: dict[str, str]) -> None:
        """Step ``step`` is done; ``fields`` (name -> shown value: loss, lr, ...) describe it."""
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update()
        now = time.monotonic()
        if self.lines and (step % EVERY_STEPS == 0 or step == self.last or now - self.shown >= EVERY_SECONDS):
            self.shown = now
            elapsed = now - self.start
            remaining = elapsed / (step - self.first + 1) * (self.last - step)
            _say(f"step {step}/{self.last} " + " ".join(f"{k} {v}" for k, v in fields.items())
                 + f" elapsed {tqdm.format_interval(elapsed)} remaining {tqdm.format_interval(remaining)}")

    def close(self) -> None:
        self.bar.close()
