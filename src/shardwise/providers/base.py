"""The seam between weights and compute: the model asks a provider for each block's tensors.

Three calls, as in llm.q's weights manager: ``gather(block)`` starts bringing a block's
tensors, ``get(block)`` waits for them and returns them, ``release(block)`` lets their
buffer be reused. The model walks its blocks ("embed", "layers.N", "head") through
``stream``, which keeps ``prefetch`` blocks in flight ahead of the one computing, so the
same model code runs over resident weights, ZeRO-3 shards and a layer-sharded series.

The call order is checked here, once for every provider: a ``get`` without a
``gather``, a second ``gather`` or a ``release`` of a block not gathered is a
``ProviderError`` naming the rank and the block, instead of silently wrong weights.
The update hooks (``begin_update`` ... ``end_update``) are what an optimizer step
calls to reach the masters block by block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..plan.rank import RankPlan


class ProviderError(RuntimeError):
    """A provider was called out of order."""


def short_names(plan: RankPlan, block: str) -> dict[str, str]:
    """A block's work tensor names, each with its kind, as the layer code knows it: ``layers.3.qkv`` -> ``qkv``."""
    return {name: name.kind for name in plan.blocks[block]}


class Provider:
    """The call-order checks and the update hooks; subclasses move the bytes.

    ``prefetch`` is how many blocks ahead ``stream`` gathers; ``trace``, when set to a
    list, records every call as ``(call, block)``, which is how the prefetch order is tested.
    """

    prefetch = 0
    device: torch.device  # where the masters are updated
    lockstep = False  # whether the DP ranks must make the same calls (their gathers are collective)
    offload = False  # whether the masters live in host memory, reaching the device only to be updated

    def __init__(self, plan: RankPlan, dtype: torch.dtype):
        self.plan, self.dtype = plan, dtype  # dtype: what the work tensors are computed in
        self.held: set[str] = set()  # blocks gathered and not yet released
        self.closed = False
        self.fetched: set[str] | None = None  # blocks whose masters an update has fetched; None outside an update
        self.trace: list[tuple[str, str]] | None = None

    @property
    def state_device(self) -> torch.device:
        """Where what scales with the masters lives: the masters, and an optimizer's moments and gradient sums.

        Host memory with ``offload``, so the device keeps only what a block needs while it
        is gathered, computed or updated; else the device.
        """
        return torch.device("cpu") if self.offload else self.device

    @property
    def state_pinned(self) -> bool:
        """Whether that host memory is page-locked, as an accelerator's asynchronous copies need."""
        return self.offload and self.device.type != "cpu"

    def _fail(self, message: str) -> ProviderError:
        return ProviderError(f"rank {self.plan.rank}: {type(self).__name__}: {message}")

    def _block(self, call: str, block: str) -> None:
        if self.closed:
            raise self._fail(f"{call}({block!r}) after close()")
        if block not in self.plan.blocks:
            raise self._fail(f"{call}({block!r}): no such block on this rank (it has {', '.join(self.plan.blocks)})")
        if self.trace is not None:
            self.trace.append((call, block))

    def gather(self, block: str) -> None:
        self._block("gather", block)
        if block in self.held:
            raise self._fail(f"gather({block!r}) twice without a release in between")
        if self.fetched is not None:
            raise self._fail(f"gather({block!r}) during an update: the masters are changing (end_update() first)")
        self._start(block)
        self.held.add(block)

    def get(self, block: str) -> dict[str, torch.Tensor]:
        self._block("get", block)
        if block not in self.held:
            raise self._fail(f"get({block!r}) without a gather({block!r}) first")
        tensors = self._wait(block)
        return {short: tensors[name] for name, short in short_names(self.plan, block).items()}

    def release(self, block: str) -> None:
        self._block("release", block)
        if block not in self.held:
            raise self._fail(f"release({block!r}) of a block that is not gathered (released twice?)")
        self.held.discard(block)
        self._end(block)

    @contextlib.contextmanager
    def stream(self, blocks: list[str]) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
        """Iterate the blocks' tensors in order, ``prefetch`` blocks gathered ahead; every block released at exit.

        Block ``l + k`` is requested before block ``l`` is waited for, and block ``l - 1``
        released just before that, so at most ``k + 1`` blocks hold buffers at once.
        """
        ahead = self.prefetch

        def walk() -> Iterator[dict[str, torch.Tensor]]:
            for name in blocks[:ahead]:
                self.gather(name)
            for i, name in enumerate(blocks):
                if i + ahead < len(blocks):
                    self.gather(blocks[i + ahead])
                yield self.get(name)
                self.release(name)

        it = walk()
        try:
            yield it
        finally:
            it.close()
            for name in blocks:
                if name in self.held:
                    self.release(name)

    def _start(self, block: str) -> None:
        """Begin moving the block's bytes."""

    def _wait(self, block: str) -> dict[str, torch.Tensor]:
        """The block's work tensors by full name, once they have arrived."""
        raise NotImplementedError

    def _end(self, block: str) -> None:
        """The block's buffers may be reused."""

    # The update hooks an optimizer step calls, in this order, for every block it updates.

    def begin_update(self) -> None:
        if self.closed:
            raise self._fail("begin_update() after close()")
        if self.fetched is not None:
            raise self._fail("begin_update() twice without end_update()")
        if self.held:
            raise self._fail(f"begin_update() while {', '.join(sorted(self.held))} are gathered: release them first")
        self.fetched = set()

    def fetch_master(self, block: str) -> None:
        self._updating("fetch_master", block)
        if block in self.fetched:
            raise self._fail(f"fetch_master({block!r}) twice without release_master({block!r})")
        self._fetch(block)
        self.fetched.add(block)

    def masters_at_rest(self, block: str) -> dict[str, torch.Tensor]:
        """The block's master tensors where they live, by the names ``master`` gives them: what an update of the
        block will change, for checking it before it starts (with offload they are not the ones to update)."""
        self._block("masters_at_rest", block)
        return self._at_rest(block)

    def master(self, block: str) -> dict[str, torch.Tensor]:
        """The block's master tensors to update in place, by held name (fetched first)."""
        self._updating("master", block)
        if block not in self.fetched:
            raise self._fail(f"master({block!r}) without fetch_master({block!r}) first")
        return self._master(block)

    def release_master(self, block: str) -> None:
        self._updating("release_master", block)
        if block not in self.fetched:
            raise self._fail(f"release_master({block!r}) of a block not fetched (released twice?)")
        self.fetched.discard(block)
        self._write_back(block)

    def end_update(self) -> None:
        """Finish the update: every fetched master is released, and the work weights are stale."""
        if self.fetched is None:
            raise self._fail("end_update() without begin_update()")
        if self.fetched:
            raise self._fail(f"end_update() with masters still fetched: {', '.join(sorted(self.fetched))}")
        self.fetched = None
        self._finish_update()
        self.invalidate()

    def _updating(self, call: str, block: str) -> None:
        self._block(call, block)
        if self.fetched is None:
            raise self._fail(f"{call}({block!r}) outside begin_update() ... end_update()")

    def _fetch(self, block: str) -> None:
        """Start bringing the block's masters to the device."""

    def _at_rest(self, block: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _master(self, block: str) -> dict[str, torch.Tensor]:
        """Where the fetched masters are updated: by default where they live."""
        return self._at_rest(block)

    def _write_back(self, block: str) -> None:
        """Start returning the block's updated masters to where they live."""

    def _finish_update(self) -> None:
        """Wait until every write-back has landed."""

    def invalidate(self) -> None:
        """The masters changed: nothing derived from them may be reused."""

    def stats(self) -> dict[str, int]:
        """Gathers issued, bytes they moved into this rank's buffers, and gathers the version cache saved."""
        return {"gathers": 0, "bytes": 0, "hits": 0}

    def nbytes(self) -> dict[str, int]:
        """Bytes this provider has allocated, by role."""
        return {"masters": 0, "work": 0, "staging": 0}

    def close(self) -> None:
        """Free what the provider allocated beyond the weights (buffers, shared memory); later calls are refused."""
        self.closed = True
