"""Text in and out of a checkpoint: its tokenizer.json, its chat template, and streamed decoding.

Uses the `tokenizers` and `jinja2` packages (the `hf` extra) directly rather than
transformers, so the CLI starts quickly and every rank can tokenize on its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO


class Text:
    def __init__(self, checkpoint: str | Path):
        from tokenizers import Tokenizer

        directory = Path(checkpoint)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json, so text prompts cannot be encoded")
        self.tokenizer = Tokenizer.from_file(str(path))
        cfg_path = directory / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        gen_path = directory / "generation_config.json"
        self.generation = json.loads(gen_path.read_text()) if gen_path.exists() else {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, user: str) -> str:
        """The prompt the checkpoint's own chat template makes of one user turn."""
        import jinja2

        template = self.config.get("chat_template")
        if not template:
            raise ValueError("the checkpoint's tokenizer_config.json has no chat_template; drop --chat")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(template).render(
            messages=[{"role": "user", "content": user}],
            add_generation_prompt=True,
            bos_token=self.config.get("bos_token", ""),
            eos_token=self.config.get("eos_token", ""),
        )

    def eos_ids(self) -> list[int]:
        """End-of-sequence ids from generation_config.json, else the tokenizer's eos token."""
        eos = self.generation.get("eos_token_id")
        if eos is None and isinstance(self.config.get("eos_token"), str):
            eos = self.tokenizer.token_to_id(self.config["eos_token"])
        if eos is None:
            return []
        return eos if isinstance(eos, list) else [eos]


def _raise(message: str):
    raise ValueError(message)


class Streamer:
    """Prints new text as ids arrive; decoding the whole tail each time keeps multi-byte characters whole."""

    def __init__(self, text: Text, out: TextIO):
        self.text, self.out = text, out
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, new_ids) -> None:
        self.ids.append(int(new_ids[0]))
        decoded = self.text.decode(self.ids)
        if decoded.endswith("\ufffd"):
            return
        self.out.write(decoded[len(self.shown) :])
        self.out.flush()
        self.shown = decoded
