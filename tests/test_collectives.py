"""The autograd-aware collectives and the vocab-parallel loss: forwards and gradients equal to one process's math.

Each world size is one launch running every case (spawning is the slow part); the cases
cover even and uneven slices, and a rank whose slice is a single column.
"""

from __future__ import annotations

import platform
import sys

import collective_workers as cw
import pytest
import torch
import torch.nn.functional as F

from shardwise import launch
from shardwise.dist.collectives import copy_to, gather_from, reduce_from, reduce_scatter_to, shared_sum
from shardwise.train.loss import IGNORE_INDEX, vocab_parallel_cross_entropy

SIZES = {2: [(3, 3), (4, 3), (6, 1)], 3: [(2, 2, 2), (3, 2, 2), (1, 5, 1)]}
DTYPES = {"float64": 1e-12, "float32": 1e-5}
TRANSPORTS = ("gloo", "shared memory")
TIMEOUT = 120


BIG = 1100  # rows of 4 KiB: more than a shared-memory slot holds
EXCHANGES = {  # world -> (rows each rank sends each rank, row shape, dtype): uneven, empty, too big for one rank
    2: [(((2, 3), (1, 0)), (8,), "float32"), (((0, 0), (0, 0)), (8,), "float32"), (((1, 1), (1, 1)), (), "int64"),
        (((BIG, 1), (1, 1)), (1024,), "float32"), (((4, 0), (5, 6)), (3, 5), "bfloat16")],
    3: [(((1, 2, 0), (0, 0, 3), (4, 1, 1)), (16,), "float32"), (((0, 1, 0), (0, 0, 0), (0, 0, BIG)), (1024,),
                                                                     "float32")],
}


def cases(world: int) -> list[tuple[str, tuple]]:
    out = [("primitives", (sizes, transport, dim)) for sizes in SIZES[world] for transport in TRANSPORTS
           for dim in (0, -1)]
    out += [("all_to_all", exchange) for exchange in EXCHANGES[world]]
    return out + [("cross_entropy", (sizes, dtype)) for sizes in SIZES[world] for dtype in DTYPES]


@pytest.fixture(scope="module")
def results() -> dict[int, dict[tuple[str, tuple], list[dict[str, float]]]]:
    out = {}
    for world in SIZES:
        found = launch(cw.run, world, cases(world), timeout=TIMEOUT)
        out[world] = dict(zip(cases(world), found))
    return out


PRIMITIVE_CASES = [(world, sizes) for world in SIZES for sizes in SIZES[world]]
PRIMITIVES = ("copy", "reduce", "reduce-scatter", "gather", "shared sum", "gathered linear")


@pytest.mark.parametrize("dim", (0, -1))
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("world,sizes", PRIMITIVE_CASES, ids=str)
def test_primitives_forward_and_gradient_match_one_process(results, world, sizes, transport, dim):
    """copy / reduce / reduce-scatter / gather / shared sum / the projection of gathered tokens in float64, through
    gloo and through shared memory in rounds of 64 bytes, slices along either dim: forward exact, gradient that of
    the summed loss in one process."""
    for rank, errors in enumerate(results[world][("primitives", (sizes, transport, dim))]):
        used = errors.pop("shared memory")
        if transport == "shared memory" and sys.platform == "linux" and platform.machine() == "x86_64":
            assert used, f"rank {rank} of {world}: no shared memory"
        assert set(errors) == {f"{p} {what}" for p in PRIMITIVES for what in ("forward", "grad")} | {
            "gathered linear weight grad"}
        bad = {k: v for k, v in errors.items() if not v <= 1e-12}
        assert not bad, f"rank {rank} of {world}, sizes {sizes}, {transport}, dim {dim}: {bad}"


@pytest.mark.parametrize("world,exchange", [(w, e) for w in EXCHANGES for e in EXCHANGES[w]], ids=str)
def test_shared_memory_all_to_all_equals_gloo(results, world, exchange):
    """The EP ranks' all-to-all through shared memory gives gloo's rows bit for bit, uneven and empty sends
    included; where one rank's rows do not fit its slot, every rank declines alike and gloo carries them. Rows
    sent in runs with their counts (a sparse layer's dispatch) arrive as gloo's, with each sender's runs."""
    counts, row, _ = exchange
    fits = all(sum(sent) * max(1, torch.Size(row).numel()) * 4 < 4 << 20 for sent in counts)
    for rank, out in enumerate(results[world][("all_to_all", exchange)]):
        assert out["equal"] and out["runs"] and out["runs over gloo"], f"rank {rank} of {world}: {exchange}: {out}"
        if sys.platform == "linux" and platform.machine() == "x86_64":
            assert out["shared memory"] == fits, f"rank {rank} of {world}: {exchange}: {out}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world,sizes", PRIMITIVE_CASES, ids=str)
def test_vocab_parallel_loss_matches_cross_entropy_on_full_logits(results, world, sizes, dtype):
    """Loss and logits' gradient equal ``F.cross_entropy`` of the gathered logits, for every reduction, with
    ignored targets, on uneven vocab slices."""
    for rank, errors in enumerate(results[world][("cross_entropy", (sizes, dtype))]):
        assert len(errors) == 6
        bad = {k: v for k, v in errors.items() if not v <= DTYPES[dtype]}
        assert not bad, f"rank {rank} of {world}, vocab slices {sizes}, {dtype}: {bad}"


def test_one_rank_group_is_the_identity():
    """With no group (one rank) every primitive returns its input and the loss is plain cross-entropy."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for y in (copy_to(x, None), reduce_from(x, None), reduce_scatter_to(x, [4], None), gather_from(x, [4], None),
              shared_sum(x, None)):
        assert y is x
    targets = torch.tensor([1, IGNORE_INDEX, 3])
    loss = vocab_parallel_cross_entropy(x, targets, 0, None)
    loss.backward()
    reference = x.detach().clone().requires_grad_()
    F.cross_entropy(reference, targets).backward()
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), targets), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, reference.grad, rtol=0, atol=1e-12)


def test_bf16_logits_are_reduced_in_fp32():
    """The loss of bf16 logits is fp32 math on them, as HF upcasts its logits: never rounded back to bf16."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 8
    targets = torch.arange(4) * 7
    low = vocab_parallel_cross_entropy(logits.bfloat16(), targets, 0, None, reduction="none")
    high = F.cross_entropy(logits.bfloat16().float(), targets, reduction="none")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, high, rtol=1e-6, atol=0)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"reduction 'avg'"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0, None, reduction="avg")
    with pytest.raises(ValueError, match=r"targets of shape \(3,\) for logits of shape \(2, 3\): expected \(2,\)"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), 0, None)


def test_bench_reduce_scatter_moves_a_reduce_scatters_bytes(capsys):
    """``shardwise bench reduce-scatter --json``: both paths sum alike; the shared-memory one moves a
    reduce-scatter's bytes per rank, gloo's all-reduce twice as many."""
    import json

    from shardwise.cli import main

    main(["bench", "reduce-scatter", "--world", "2", "--megabytes", "0.25", "--repeats", "1", "--json"])
    row = json.loads(capsys.readouterr().out)
    assert row["same_sums"] is True
    assert row["shared_memory_bytes"] == row["reduce_scatter_bytes"] == row["block_bytes"] / 2
    assert row["gloo_bytes"] == 2 * row["reduce_scatter_bytes"]
    assert all(row[k] > 0 for k in ("shared_memory_s", "gloo_s", "memcpy_s"))
