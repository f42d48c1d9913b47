"""The `shardwise` command line: ``parser`` builds it and hands each command to its module (``generate``,
``train``, ``plan``, ``checkpoints``, ``bench``); ``args`` holds what they share."""

from .parser import main

__all__ = ["main"]
