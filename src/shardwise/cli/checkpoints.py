"""The commands that write a checkpoint (`import-gguf`, `reshard`, `init`, `export`) and the rank jobs behind
them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..io.loader import Provide
from ..io.publish import check_target
from ..io.reader import MANIFEST
from ..launch import launch
from ..plan.mesh import Layout
from ..plan.spec import load_spec
from ..words import plural
from .args import _checkpoint_dir, _layout, _plan_everywhere, _report, _world


def cmd_import_gguf(args) -> None:
    from ..io.gguf.importer import import_gguf

    out = import_gguf(args.gguf, args.out_dir, args.dtype, overwrite=args.overwrite)
    _report(f"wrote {out}")


def write_rank(src: str, out: str, layout: Layout, provide: Provide, sharded: bool, overwrite: bool,
               dtype: torch.dtype | None = None) -> None:
    """Load this rank's part of ``src`` and write it to ``out``: a sharded checkpoint, or HF safetensors; in
    ``dtype``, or each tensor in the dtype ``src`` holds it in."""
    from ..io.hf_export import export
    from ..io.loader import load_weights
    from ..io.sharded import save_sharded

    weights = load_weights(src, layout, dtype, provider=provide.provider, series=provide.series)
    if dtype is not None:  # written as loaded, not cast back to the source's dtypes
        weights = dataclasses.replace(weights, source_dtypes=dict.fromkeys(weights.source_dtypes, dtype))
    (save_sharded if sharded else export)(weights, out, overwrite=overwrite)


def _written_dtype(args) -> torch.dtype | None:
    """--dtype; else for a training checkpoint, whose files hold fp32 masters, the dtype of the model it was trained
    from; else None: each tensor stays in SRC's dtype."""
    from ..train.state import trained_from

    return args.dtype or trained_from(args.src)


def cmd_reshard(args) -> None:
    from ..io.loader import open_source

    check_target(args.dst, args.overwrite, [args.src])  # before spawning: a refusal costs nothing
    if args.dp > 1 and args.provider == "resident":
        raise ValueError(f"--dp {args.dp} with resident weights would save {args.dp} identical copies; "
                         "use --provider zero3 to save each replica's 1/dp")
    series = tuple(args.series)
    spec = _plan_everywhere(args.src, _layout(args), args.provider, series)
    with open_source(args.src) as source:
        source.check(spec)
    launch(write_rank, _world(args), args.src, args.dst, _layout(args), Provide(args.provider, series=series), True,
           args.overwrite, _written_dtype(args))
    _report(f"wrote {args.dst} (sharded, {_layout(args)}, {args.provider})")


def init_rank(config: str, out: str, layout: Layout, seed: int, dtype: torch.dtype, sharded: bool,
              zero_residual: bool, overwrite: bool) -> None:
    from ..io.hf_export import export
    from ..io.sharded import save_sharded
    from ..model.init import init_weights

    provider = "zero3" if layout.dp > 1 else "resident"  # replicas would draw the same boxes dp times
    path = Path(config)
    weights = init_weights(load_spec(path), layout, seed, provider=provider, dtype=dtype, zero_residual=zero_residual,
                           source_dir=path if path.is_dir() else path.parent)
    (save_sharded if sharded else export)(weights, out, overwrite=overwrite)


def cmd_init(args) -> None:
    check_target(args.out, args.overwrite, [])
    _plan_everywhere(args.config, _layout(args), config_file=True)
    launch(init_rank, _world(args), args.config, args.out, _layout(args), args.seed, args.dtype, args.sharded,
           args.zero_residual, args.overwrite)
    _report(f"wrote {args.out} ({'sharded' if args.sharded else 'HF safetensors'}, seed {args.seed}, "
            f"initialised by {plural(_world(args), 'rank')})")


def cmd_export(args) -> None:
    from ..io.sharded import ShardedCheckpoint

    check_target(args.out, args.overwrite, [args.src])
    if not (Path(_checkpoint_dir(args.src)) / MANIFEST).is_file():
        raise ValueError(f"{args.src}: export takes a sharded checkpoint (one with {MANIFEST}); an HF checkpoint "
                         "needs no export: `shardwise reshard` makes a sharded one of it")
    source = ShardedCheckpoint(args.src)
    source.check(load_spec(args.src))  # the manifest's layout says how many ranks to spawn: vet it first
    layout = source.layout
    launch(write_rank, layout.world_size, args.src, args.out, layout, Provide(source.provider, series=source.series),
           False, args.overwrite, _written_dtype(args))
    _report(f"wrote {args.out} (HF safetensors, exported by {plural(layout.world_size, 'rank')})")
