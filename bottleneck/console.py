"""Terminal output shared by the stages: progress bars and warnings go to stderr, results to stdout."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

err = Console(stderr=True, highlight=False)


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:6.1f} {self.unit}/s" if task.speed else f"     ? {self.unit}/s")


def progress_bar(unit: str = "img", enabled: bool = True) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(unit),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=not enabled)


def warn(message: str) -> None:
    err.print(Text("warning: ", style="yellow") + Text(message), soft_wrap=True)


def note(message: str) -> None:
    err.print(message, markup=False, soft_wrap=True)
