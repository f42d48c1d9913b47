"""Progress bars for long work, drawn only where a person is watching.

On a terminal a bar redraws in place; in a log file or CI output every redraw would
be a line of carriage-return debris, so there the bar is off and logging speaks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], enabled: bool = True, **kwargs) -> Iterator[T]:
    """``items``, with a tqdm bar on stderr when ``enabled`` and stderr is a terminal."""
    show = enabled and sys.stderr.isatty()
    return iter(tqdm(items, disable=not show, leave=False, **kwargs))


def progress_meter(enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr to drive by hand (``update``, ``set_postfix``), drawn as ``progress_bar``'s is."""
    return tqdm(disable=not (enabled and sys.stderr.isatty()), leave=False, **kwargs)
