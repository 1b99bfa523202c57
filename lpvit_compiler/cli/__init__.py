"""The ``lpvit`` command line."""

from .commands import main

__all__ = ["main"]
