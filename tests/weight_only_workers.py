"""Functions the int8 weight-only tests run inside spawned ranks."""

from __future__ import annotations

import torch


def int8_runs(layout, checkpoints: dict[str, str], ids: torch.Tensor, steps: int, head: bool,
              exports: dict[str, str]) -> dict:
    """Every checkpoint loaded int8 weight-only under ``layout`` (fp32 compute, the LM head quantized if ``head``):
    logits, greedy tokens, the provider's bytes, and where ``exports`` names a directory, an export to it and a
    sharded save beside it (``-sharded``)."""
    from shardwise import export, load_model, save_sharded

    out = {}
    for name, path in checkpoints.items():
        with load_model(path, layout, progress=False, weight_only="int8", quantize_head=head) as model:
            row = {"logits": model(ids), "tokens": model.generate(ids, steps), "bytes": model.provider.nbytes()}
            if name in exports:
                export(model, exports[name], progress=False)
                save_sharded(model.weights, exports[name] + "-sharded")
            out[name] = row
    return out
