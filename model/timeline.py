"""Where a run's time goes: timeline.jsonl, one JSON line per event, appended by rank 0 and never cut back.

metrics.jsonl is cut back to the resumed step on every resume (one history of the model), so what a lost
launch spent would vanish with it; this file keeps every launch. orchestrator/accounting.py reads it with
the run record's launch times and prices each second. Events (all with "time", unix seconds, this host's
clock):

    start  a launch reached its first step: began (when its driver started), staging_s, data_s (the staged
           data fetched to the node), restore_s (the checkpoint loaded), start_step, tokens
    clock  cumulative seconds of this launch's loop by state (training, evaluating, checkpointing), at a
           step; written at every log step
    interval  checkpoint_every=auto chose an interval: steps, seconds, cost_s (measured or estimated),
           mtbf_s and the arithmetic
    end    the loop ended (finished or stopped), with the final clock

A killed launch leaves its last clock: the time after it is priced as recovery, and the steps after the
checkpoint it resumes from as redone.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from model.metrics import read_metrics

TIMELINE = "timeline.jsonl"
LOOP_STATES = ("training", "evaluating", "checkpointing")


def read_timeline(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a timeline.jsonl (a line torn by a crash is skipped)."""
    return read_metrics(path)  # the same JSON lines, read the same way


class Clock:
    """One launch's loop time by state. Everything between start() and end() that no phase() claims is
    training (the step itself, logging, the stop poll); phase("evaluating") and phase("checkpointing")
    claim their spans. Rank 0 writes; on other ranks every call is a no-op but phase() still times."""

    def __init__(self, run_dir: Path, enabled: bool, began: float | None = None, staging_s: float = 0.0):
        self.path, self.enabled = Path(run_dir) / TIMELINE, enabled
        self.began, self.staging_s = began, staging_s
        self.seconds = dict.fromkeys(LOOP_STATES, 0.0)
        self._loop_began = time.time()

    def start(self, step: int, tokens: int, data_s: float = 0.0, restore_s: float = 0.0) -> None:
        """The launch's first step is next: from here on its time is the loop's. data_s: fetching the staged
        data to this node; restore_s: loading the checkpoint (or the init_from weights)."""
        self._loop_began = time.time()
        began = self.began if self.began is not None else self._loop_began
        self._write(
            {
                "event": "start",
                "began": round(began, 3),
                "staging_s": round(self.staging_s, 3),
                "start_step": step,
                "tokens": tokens,
                "data_s": round(data_s, 3),
                "restore_s": round(restore_s, 3),
            },
            now=self._loop_began,
        )

    @contextmanager
    def phase(self, state: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[state] += time.perf_counter() - t0

    def tick(self, step: int, tokens: int, event: str = "clock", **extra: Any) -> None:
        """This launch's loop seconds by state so far, at `step`."""
        now = time.time()
        spent = now - self._loop_began
        others = self.seconds["evaluating"] + self.seconds["checkpointing"]
        seconds = {**self.seconds, "training": max(spent - others, 0.0)}
        rec = {"event": event, "step": step, "tokens": tokens, "seconds": _rounded(seconds), **extra}
        self._write(rec, now=now)

    def end(self, step: int, tokens: int, stopped: bool) -> None:
        self.tick(step, tokens, event="end", stopped=stopped)

    def note(self, event: str, **fields: Any) -> None:
        self._write({"event": event, **fields}, now=time.time())

    def _write(self, rec: dict[str, Any], now: float) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one write: a line stays whole
            f.write(json.dumps({**rec, "time": round(now, 3)}) + "\n")


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in seconds.items()}
