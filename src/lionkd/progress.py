"""The one look of lionkd's progress bars: description, bar, counts, rate, elapsed time and ETA, on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "", style="progress.data.speed")


def stage_bars(enabled: bool = True, console: Console | None = None) -> Progress:
    """A progress display for one stage; add a task per unit of work."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console or Console(stderr=True),
                    disable=not enabled, transient=False)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Progress]:
    """`stage_bars` shown for the duration of a block (one display per stage, so training can print its own)."""
    with stage_bars(enabled) as bars:
        yield bars
