"""Where the command line's output goes: results to stdout, progress and notes to stderr."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Ui:
    """Where output goes: results to stdout, progress and notes to stderr, nothing but errors with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.out = Console(quiet=quiet, width=200)
        self.err = Console(stderr=True, quiet=quiet)

    def note(self, text: str) -> None:
        self.err.print(text, highlight=False)

    @contextmanager
    def bar(self, description: str, total: int):
        """A progress bar; yields a callable that advances it (by 1 or by n)."""
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.err, disable=self.quiet, transient=False) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)

    @contextmanager
    def status(self, text: str):
        if self.quiet:
            yield
        else:
            with self.err.status(text):
                yield
            self.note(f"{text} done")
