"""Functions the prompt-table tests run inside spawned ranks."""

from __future__ import annotations

import torch


def with_tables(layout, path: str, tables: dict[str, str], ids: torch.Tensor, ragged: list[list[int]],
                steps: int) -> dict:
    """Under ``layout``: logits of task a's virtual tokens then ``ids``, greedy tokens of ``ids`` with task a, of
    the ``ragged`` prompts with task a, and of them with tasks a and b by row."""
    from shardwise import load_model

    with load_model(path, layout, progress=False, prompt_tables=tables) as model:
        virtual = model.prompts.ids("a", model.spec.vocab)[None].expand(len(ids), -1)
        return {"logits": model(torch.cat([virtual, ids], dim=1)),
                "batch": model.generate(ids, steps, task="a"),
                "ragged": model.generate(ragged, steps, task="a"),
                "mixed": model.generate(ragged, steps, task=["a", "b"])}
