"""Text in and out of a checkpoint: its tokenizer.json, its chat template, and streamed decoding.

Uses the `tokenizers` and `jinja2` packages (the `hf` extra) directly rather than
transformers, so the CLI starts quickly and every rank can tokenize on its own.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import TextIO

from ..untrusted import UntrustedJSON, is_int, parse_json, shown


class Text:
    def __init__(self, checkpoint: str | Path):
        from tokenizers import Tokenizer

        self.directory = directory = Path(checkpoint)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json, so text prompts cannot be encoded")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception types
            raise ValueError(f"{path}: not a readable tokenizer ({e})") from None
        # transformers' __call__ (no truncation or padding asked for) switches off any that tokenizer.json
        # carries; left on, a prompt longer than the file's max_length would silently lose its end.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.config = _json_object(directory / "tokenizer_config.json")
        self.generation = _json_object(directory / "generation_config.json")

    def encode(self, text: str, special: bool = True) -> list[int]:
        """The ids of ``text``; with ``special``, also the BOS/EOS that tokenizer.json's post_processor adds.

        That post_processor alone decides, as in transformers 5: when a tokenizer.json is present, its
        ``_from_pretrained`` drops tokenizer_config.json's ``add_bos_token``/``add_eos_token`` (so LlamaTokenizer
        and Gemma's too keep the file's post_processor), and a null one becomes a template adding nothing.
        Without ``special`` this is ``tokenizer(text, add_special_tokens=False)``, for text that already spells
        out its special tokens, like a rendered chat template.
        """
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        """The ids HF would give the model for ``prompt``: ``tokenizer(prompt).input_ids``, or with ``chat``
        ``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``, which encodes the rendered
        template without special tokens since the template writes its own (Llama 3's starts with BOS)."""
        if chat:
            return self.encode(self.chat_prompt(prompt), special=False)
        return self.encode(prompt)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_template(self) -> str:
        """The template transformers would use: ``chat_template.jinja`` (transformers >= 4.43 saves it there),
        else ``tokenizer_config.json``'s, which may also be a list of named templates."""
        jinja = self.directory / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        template = self.config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str) or not template:
            raise TemplateError(f"{self.directory}: no chat template (neither chat_template.jinja nor a chat_template "
                             "in tokenizer_config.json); drop --chat")
        return template

    def chat_prompt(self, user: str) -> str:
        """The prompt the checkpoint's own chat template makes of one user turn, rendered in a sandbox.

        A template comes with a downloaded checkpoint, so it is untrusted code: like HF,
        render it in jinja2's immutable sandbox, where it can reach no Python internals.
        """
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals |= {"raise_exception": _raise, "strftime_now": _strftime_now}
        try:
            return env.from_string(self.chat_template()).render(
                messages=[{"role": "user", "content": user}],
                add_generation_prompt=True,
                bos_token=_token_text(self.config.get("bos_token")),
                eos_token=_token_text(self.config.get("eos_token")),
            )
        except SecurityError as e:
            raise TemplateError(f"{self.directory}: the chat template tried an operation the sandbox forbids "
                                f"({e}); it was not run") from None
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - untrusted code: whatever it does wrong ({{ 1/0 }}) is its error
            raise TemplateError(f"{self.directory}: the chat template failed: {type(e).__name__}: {e}") from None

    def eos_ids(self) -> list[int]:
        """End-of-sequence ids from generation_config.json, else the tokenizer's eos token."""
        eos = self.generation.get("eos_token_id")
        if eos is None and isinstance(self.config.get("eos_token"), str):
            eos = self.tokenizer.token_to_id(self.config["eos_token"])
        ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(is_int(i) and 0 <= i < self.tokenizer.get_vocab_size() for i in ids):
            raise ValueError(f"{self.directory}: eos_token_id {eos!r} is not a list of token ids")
        return ids


def _json_object(path: Path) -> dict:
    """A JSON object from an optional side file of the checkpoint; absent means empty."""
    if not path.exists():
        return {}
    try:
        value = parse_json(path.read_bytes())
    except (OSError, UntrustedJSON) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds {shown(value)}, expected an object")
    return value


class TemplateError(ValueError):
    """A checkpoint's chat template is missing, broken or tried to escape its sandbox."""


def _raise(message: str):
    raise TemplateError(f"the chat template raised: {message}")


def _tojson(value, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    """transformers' ``tojson``: unlike jinja2's own, it keeps non-ASCII text as it is."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _token_text(token: object) -> str:
    """A special token from tokenizer_config.json: a string, or an AddedToken object with its ``content``."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


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

    def finish(self) -> None:
        self.out.write("\n")
        self.out.flush()


class LabelledAnswers:
    """Prints each answer of a batch whole, labelled ``[label]`` by its row's label, as soon as it is complete.

    Rows of a batch advance together, so interleaving their tokens would be unreadable;
    an answer is complete at its first EOS, or when generation ends.
    """

    def __init__(self, text: Text, out: TextIO, labels: tuple[str, ...]):
        self.text, self.out, self.labels = text, out, labels
        self.ids: list[list[int]] = [[] for _ in labels]
        self.pending = set(range(len(labels)))
        self.eos = set(text.eos_ids())

    def __call__(self, new_ids) -> None:
        for row, token in enumerate(new_ids.tolist()):
            if row in self.pending:
                self.ids[row].append(token)
                if token in self.eos:
                    self._show(row)

    def finish(self) -> None:
        for row in sorted(self.pending):
            self._show(row)

    def _show(self, row: int) -> None:
        self.pending.discard(row)
        self.out.write(f"[{self.labels[row]}] {self.text.decode(self.ids[row])}\n")
        self.out.flush()
