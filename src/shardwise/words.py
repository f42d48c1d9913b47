"""Counts in messages: "1 window", "2 windows"; a message that says "1 windows" reads as a bug."""

from __future__ import annotations


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless n is 1 (English's regular plural: boxes, micro-batches, windows)."""
    return f"{n} {noun if n == 1 else noun + ('es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's')}"


def listed(noun: str, items: list) -> str:
    """``noun`` (in the plural unless there is one item) and the items: "rank 2", "ranks 2, 3"."""
    return f"{noun if len(items) == 1 else noun + 's'} {', '.join(map(str, items))}"
