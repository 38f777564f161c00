"""One progress-bar style for long loops: description, bar, done/total, items per second, ETA."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["rate_progress"]


def rate_progress(enabled: bool = True, unit: str = "img", rate_label: str | None = None) -> Progress:
    """A transient rich progress bar; tasks carry a ``rate`` field shown as ``<rate> <unit>/s``
    (or, with ``rate_label``, as ``<rate_label> <rate>``: e.g. the last epoch's loss)."""
    shown = f"{rate_label} {{task.fields[rate]}}" if rate_label else f"{{task.fields[rate]}} {unit}/s"
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(shown), TimeRemainingColumn(), disable=not enabled, transient=True)
