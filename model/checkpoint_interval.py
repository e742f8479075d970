"""How often to checkpoint when `train.checkpoint_every: auto`: Young/Daly's interval, sqrt(2 C M).

C is what one checkpoint costs in seconds (the state's size over the store's bandwidth: the run measures it
on its first commit and uses that from then on), M the run's mean time between interruptions (all its
nodes; a spot preemption rate from configs/pricing/preemption.yaml, or hardware failures on demand).
Checkpointing every tau seconds loses C / tau of the time to writing and, per interruption, tau / 2 of work
on average: the sum is least at tau = sqrt(2 C M) (Young 1974; Daly 2006 adds higher-order terms that
matter only when C is near M).

Two bounds keep it sane: never more often than one commit takes (only one save is in flight, so a shorter
interval would make training wait), and never longer than MAX_INTERVAL_S, so a stop, a bad node or a bug
never costs more than that much work. Pure arithmetic: `lmctl plan` shows the same numbers the loop uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_INTERVAL_S = 3600.0  # at most an hour of work between checkpoints, whatever the rate says
STEADY = 0.25  # AutoCheckpoints keeps its interval while a new one is within this share of it


@dataclass(frozen=True)
class Interval:
    seconds: float  # the interval chosen
    young_daly_s: float  # sqrt(2 C M) before the bounds
    cost_s: float  # C: seconds one checkpoint takes to commit
    mtbf_s: float  # M: the run's mean seconds between interruptions
    bound: str | None  # None, or which bound applied: "one commit" or "at most 1 h"

    def steps(self, step_s: float) -> int:
        """The interval in optimizer steps of `step_s` seconds each (at least 1)."""
        return max(1, round(self.seconds / max(step_s, 1e-9)))

    def explain(self) -> str:
        """The arithmetic in one line, for plan and the log."""
        text = (
            f"sqrt(2 x {self.cost_s:.3g} s checkpoint x {self.mtbf_s / 3600:.3g} h between interruptions) "
            f"= {_duration(self.young_daly_s)}"
        )
        return text + (f", bounded by {self.bound}: {_duration(self.seconds)}" if self.bound else "")


def young_daly_s(cost_s: float, mtbf_s: float) -> float:
    """Young/Daly's first-order optimum: sqrt(2 C M) seconds."""
    return math.sqrt(2.0 * cost_s * mtbf_s)


def choose(cost_s: float, mtbf_s: float, max_s: float = MAX_INTERVAL_S) -> Interval:
    """The interval for checkpoints costing `cost_s` on a run interrupted every `mtbf_s` on average."""
    if not (cost_s >= 0 and mtbf_s > 0):
        raise ValueError(f"checkpoint cost {cost_s} s and MTBF {mtbf_s} s must be >= 0 and > 0")
    ideal = young_daly_s(cost_s, mtbf_s)
    seconds, bound = ideal, None
    if seconds < cost_s:
        seconds, bound = cost_s, "one commit"
    if seconds > max_s:
        seconds, bound = max_s, f"at most {_duration(max_s)}"
    return Interval(seconds, ideal, cost_s, mtbf_s, bound)


def expected_loss_fraction(interval_s: float, cost_s: float, mtbf_s: float) -> float:
    """First-order share of time lost with checkpoints every `interval_s`: C / tau for writing (an upper
    bound when saves overlap training) plus tau / (2 M) redone after interruptions."""
    return cost_s / interval_s + interval_s / (2.0 * mtbf_s)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class AutoCheckpoints:
    """checkpoint_every=auto in the loop: when the next save is due. The cost is the launch's estimate
    until its first commit is measured (commit seconds, from the snapshot on), then that measurement; with
    neither, the first save comes at the first update, to measure it. update() runs on every rank with the
    same step seconds (the loop shares rank 0's), so every rank saves at the same step."""

    def __init__(self, mtbf_s: float, estimate_s: float | None, max_s: float = MAX_INTERVAL_S):
        self.mtbf_s, self.estimate_s, self.max_s = mtbf_s, estimate_s, max_s
        self.measured_s: float | None = None
        self.interval: Interval | None = None
        self.every: int | None = None  # steps; None until the first update
        self.last_save = 0
        self.measuring = False  # a save made only to measure the cost has been asked for

    def committed(self, seconds: float) -> None:
        """A save committed, `seconds` after its snapshot: the first measurement is the cost from now on."""
        if self.measured_s is None:
            self.measured_s = seconds

    @property
    def cost_s(self) -> float | None:
        return self.measured_s if self.measured_s is not None else self.estimate_s

    def update(self, step_s: float) -> bool:
        """Re-derive the interval in steps from the step time; True when it changed. Step times jitter, so
        an interval within STEADY of the current one is kept (unless the cost itself changed)."""
        every: int | None
        if self.cost_s is None:  # nothing known: one save at once, to measure; none more until it commits
            every = None if self.measuring else 1
            self.measuring = True
        else:
            interval = choose(self.cost_s, self.mtbf_s, self.max_s)
            every = interval.steps(step_s)
            same_cost = self.interval is not None and self.interval.cost_s == interval.cost_s
            if same_cost and self.every is not None and abs(every - self.every) <= STEADY * self.every:
                return False
            self.interval = interval
        changed, self.every = every != self.every, every
        return changed

    def due(self, step: int) -> bool:
        return self.every is not None and step - self.last_save >= self.every

    def saved(self, step: int) -> None:
        self.last_save = step
        if self.cost_s is None:  # that was the save to measure: none more until it has committed
            self.every = None
