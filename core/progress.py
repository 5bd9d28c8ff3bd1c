"""Progress display for long operations (run steps, validation plans, profile sweeps, serving
repeats): one rich.progress bar on stderr.

The CLI decides whether a bar is wanted (`wanted`: not with --json, and only when stderr is a
terminal); library code takes that decision as a flag. Ranks started by torchrun write to a
pipe that the launcher relays to its terminal, so they draw with `force_terminal` when the
launcher said the bar is wanted."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


def wanted(json_output: bool = False) -> bool:
    """Show progress: not when printing JSON, and only to a terminal."""
    return not json_output and sys.stderr.isatty()


class Bar:
    """One task of a rich Progress; `advance` and `describe` are no-ops when hidden."""

    def __init__(self, progress: Progress | None, task=None):
        self._progress, self._task = progress, task

    def advance(self, steps: float = 1) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=steps)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def progress_bar(total: float | None, label: str, show: bool,
                 force_terminal: bool = False) -> Iterator[Bar]:
    """A bar counting to `total` (None: unknown) on stderr, shown when `show`."""
    if not show:
        yield Bar(None)
        return
    console = Console(file=sys.stderr, force_terminal=force_terminal or None)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as progress:
        yield Bar(progress, progress.add_task(label, total=total))
