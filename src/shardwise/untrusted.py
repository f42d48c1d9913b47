"""Reading values from files a stranger wrote: JSON that may be deep, broken or of the wrong types.

Every parser of a checkpoint (config, safetensors header, index, manifest, GGUF
metadata) asks the same two questions, so they are answered once here: is this JSON
at all, and is this value really an integer (Python counts ``True`` as one; JSON and
GGUF do not).
"""

from __future__ import annotations

import json


class UntrustedJSON(ValueError):
    """Bytes that do not parse as JSON, for any reason (syntax, encoding, nesting too deep)."""


def parse_json(raw: bytes | str) -> object:
    """``json.loads`` whose every failure is one error: a hostile file may also nest ``[[[[...`` past the stack."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UntrustedJSON(f"not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def is_int(value: object) -> bool:
    """An integer, and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def shown(value: object, width: int = 60) -> str:
    """A value as an error message quotes it: its type and a bounded repr."""
    return "missing" if value is None else f"{type(value).__name__} {repr(value)[:width]}"
