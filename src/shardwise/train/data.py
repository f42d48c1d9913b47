"""The training token stream: a text file cut into windows, in an order that depends on the seed alone.

The file is tokenized with the checkpoint's tokenizer as one stream: each paragraph
(text between blank lines) is encoded as ``Text.encode`` does, with whatever BOS/EOS
the tokenizer's post_processor adds, and paragraphs are joined with the EOS id when the
tokenizer has one. The stream is cut into non-overlapping windows of ``seq`` tokens (a
tail shorter than a window is dropped).

Step ``s`` (counted from 1) takes the global batch of windows ``(s-1)*batch .. s*batch``
of an endless sequence of epochs, each a permutation of the windows drawn from a
``torch.Generator`` seeded from ``(seed, epoch)`` only. So the data a step sees follows
from ``(seed, step)`` alone, never from the layout: DP rank ``d`` of ``dp`` takes its
``split_evenly(batch, dp)[d]`` of the step's windows and cuts them into ``accumulate``
micro-batches, and the ranks' parts together are always the same global batch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..plan.boxes import split_evenly
from ..words import plural

DROPPED_TAIL = 0.01  # a dropped tail above this share of the text is worth a warning (it never is past 100 windows)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed from (seed, epoch) alone, without the collisions of simple arithmetic."""
    digest = hashlib.sha256(f"shardwise-data:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tokenize_file(checkpoint: str | Path, path: str | Path) -> list[int]:
    """The ids of the text file ``path`` under ``checkpoint``'s tokenizer, paragraphs joined with its EOS."""
    from ..model.text import Text

    try:
        content = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the training text ({e})") from None
    text = Text(checkpoint)
    eos = text.eos_ids()
    eos_id = eos[0] if eos else None
    ids: list[int] = []
    for paragraph in re.split(r"\n\s*\n", content):
        if not paragraph.strip():
            continue
        piece = text.encode(paragraph.strip())
        ids += piece
        if eos_id is not None and (not piece or piece[-1] != eos_id):
            ids.append(eos_id)
    return ids


def check_batching(batch: int, dp: int, accumulate: int) -> None:
    """Refuse a batch that leaves some DP rank an empty micro-batch."""
    smallest = batch // dp  # split_evenly: the last ranks get the fewest windows
    if smallest < accumulate:
        raise ValueError(f"--batch {batch} over --dp {dp} gives some rank {plural(smallest, 'window')}, too few for "
                         f"--accumulate {plural(accumulate, 'micro-batch')}; "
                         f"use --batch >= {dp * accumulate}")


def thin_text(source: str, tokens: int, seq: int, batch: int) -> list[str]:
    """Warnings for a text too short for the run: fewer windows than a step takes (so every step repeats some), or a
    dropped tail that is a noticeable share of it."""
    windows, tail = divmod(tokens, seq)
    out = []
    if 0 < windows < batch:
        out.append(f"{source}: {plural(tokens, 'token')} make {plural(windows, 'window')} of --seq {seq}, fewer than "
                   f"--batch {batch}: every step repeats windows; give more text or a smaller --batch")
    if windows and tail > DROPPED_TAIL * tokens:
        out.append(f"{source}: the last {plural(tail, 'token')} of {tokens} ({tail / tokens:.0%}) fill no window of "
                   f"--seq {seq} and are never trained on")
    return out


@dataclass(frozen=True)
class TokenStream:
    """Windows of ``seq`` tokens, served ``batch`` per step in the (seed, epoch) order."""

    windows: torch.Tensor  # (n, seq) int64
    batch: int
    seed: int

    @classmethod
    def from_ids(cls, ids: list[int], seq: int, batch: int, seed: int, source: str = "the text") -> TokenStream:
        if seq < 2:
            raise ValueError(f"--seq {seq}: a window needs at least 2 tokens (one predicts the next)")
        if batch < 1:
            raise ValueError(f"--batch {batch}: a step needs at least one window")
        n = len(ids) // seq
        if n < 1:
            raise ValueError(f"{source}: {plural(len(ids), 'token')}, too few for one window of --seq {seq}; "
                             "give more text or a smaller --seq")
        windows = torch.tensor(ids[: n * seq], dtype=torch.int64).reshape(n, seq)
        return cls(windows, batch, seed)

    @classmethod
    def from_file(cls, checkpoint: str | Path, path: str | Path, seq: int, batch: int, seed: int) -> TokenStream:
        return cls.from_ids(tokenize_file(checkpoint, path), seq, batch, seed, str(path))

    @property
    def seq(self) -> int:
        return self.windows.shape[1]

    def predicted(self, virtual: int = 0) -> int:
        """The tokens a step predicts, over every rank: a window's first token only after ``virtual`` tokens of a
        prompt table (the last of them predicts it, as in PEFT's prompt tuning)."""
        return self.batch * (self.seq - (virtual == 0))

    def order(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s permutation of the windows, from (seed, epoch) alone."""
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(len(self.windows), generator=g)

    def indices(self, step: int) -> list[int]:
        """The window indices of step ``step`` (from 1), wrapping from one epoch into the next."""
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        n, out, orders = len(self.windows), [], {}
        for i in range((step - 1) * self.batch, step * self.batch):
            epoch, pos = divmod(i, n)
            if epoch not in orders:
                orders[epoch] = self.order(epoch)
            out.append(int(orders[epoch][pos]))
        return out

    def global_batch(self, step: int) -> torch.Tensor:
        """The (batch, seq) ids of step ``step`` over all ranks."""
        return self.windows[self.indices(step)]

    def micro_batches(self, step: int, dp_rank: int, dp: int, accumulate: int = 1) -> list[torch.Tensor]:
        """DP rank ``dp_rank``'s part of step ``step``, cut into ``accumulate`` micro-batches (none empty)."""
        check_batching(self.batch, dp, accumulate)
        lo, hi = split_evenly(self.batch, dp)[dp_rank]
        part = self.global_batch(step)[lo:hi]
        return [part[a:b] for a, b in split_evenly(len(part), accumulate)]
