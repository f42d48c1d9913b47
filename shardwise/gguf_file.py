"""Reading llama.cpp GGUF files, treating every byte as hostile."""

from __future__ import annotations


class GGUFError(ValueError):
    """The GGUF file is malformed or uses something shardwise cannot import."""
