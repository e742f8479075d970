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
    """One task bar plus a status line; `update()` is cheap enough to call once per batch. `report(facts)`,
    when given, hears the same progress as a dict at most every `every_s` (phase, documents, tokens,
    tokens_per_s, fraction, eta_s), bar or no bar: a detached run's staging is followed through it."""

    def __init__(self, enabled: bool, console: Console | None = None, report=None, every_s: float = 1.0):
        self.enabled, self.report, self.every_s = enabled, report, every_s
        self._progress: Progress | None = None
        self._task = None
        self._start = time.perf_counter()
        self._phase, self._total, self._reported = "", None, float("-inf")
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
        self._start, self._phase, self._total = time.perf_counter(), description, total
        if self.report:
            self.report({"phase": description, "documents": 0, "tokens": 0})
        if self._progress is None:
            return
        self._task = self._progress.add_task(description, total=total, stats=stats)

    def update(self, completed: float, docs: int, tokens: int) -> None:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        if self.report and time.monotonic() - self._reported >= self.every_s:
            self._reported = time.monotonic()
            fraction = min(completed / self._total, 1.0) if self._total else None
            self.report(
                {
                    "phase": self._phase,
                    "documents": docs,
                    "tokens": tokens,
                    "tokens_per_s": tokens / elapsed,
                    "fraction": fraction,
                    "eta_s": elapsed * (1 - fraction) / fraction if fraction else None,
                }
            )
        if self._progress is None or self._task is None:
            return
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
