"""A rich progress bar for long control-plane jobs (staging): documents, tokens, tokens/s and an ETA.

The bar measures whatever has a known total: tokens when a cap is set, else bytes of source text when
the input size is known (local files), else it only counts. It draws on stderr, so stdout stays clean
for `--json`, and it is a no-op when disabled, so library callers and tests pay nothing for it.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def human(n: float) -> str:
    """1234567 -> '1.2M' (counts in a bar must stay narrow)."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


class StageProgress:
    """One task bar plus a status line; `update()` is cheap enough to call once per batch."""

    def __init__(self, enabled: bool, console: Console | None = None):
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None
        self._start = time.perf_counter()
        if enabled:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=24),
                TaskProgressColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console or Console(stderr=True),
                transient=False,
            )
            self._progress.start()

    def phase(self, description: str, total: float | None = None, stats: str = "") -> None:
        """Start a new bar (e.g. 'training tokenizer', then 'tokenizing'); the previous one stays shown."""
        if self._progress is None:
            return
        self._start = time.perf_counter()
        self._task = self._progress.add_task(description, total=total, stats=stats)

    def update(self, completed: float, docs: int, tokens: int) -> None:
        if self._progress is None or self._task is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        stats = f"{human(docs)} docs  {human(tokens)} tokens  {human(tokens / elapsed)} tok/s"
        self._progress.update(self._task, completed=completed, stats=stats)

    def finish(self) -> None:
        """Mark the current bar complete (the estimate of the total may have been off)."""
        if self._progress is None or self._task is None:
            return
        task = self._progress.tasks[-1]
        done = max(task.total or 0, task.completed, 1)
        self._progress.update(self._task, total=done, completed=done)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
