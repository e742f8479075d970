"""Every second of a run, by state, and what it cost: from the run record's segments and timeline.jsonl.

A segment is one launch or resume: [started, ended] in run.json (started when the driver was spawned or the
SkyPilot job submitted; ended when it exited). Inside it the run's timeline (model/timeline.py) has one
`start` per launch of the training processes (several when SkyPilot recovers a preempted job) and `clock`s
after it. The spans tile the segment:

    started -> first start.began      setup      (provisioning, the task's setup, a queue: SkyPilot's part)
    start.began -> start.time         staging (start.staging_s), the rest setup (Ray, data, restore)
    start.time -> last clock          training / evaluating / checkpointing, as the loop measured them
    last clock -> next start.time     recovering (a preemption: the lost node's last seconds, provisioning,
                                      setup, data, checkpoint load); staging inside it stays staging
    end -> ended                      idle (the last upload done, processes shutting down)

What no span claims (the tail of a live run since its last clock, or a clock that disagrees with the wall)
is `unaccounted`, shown, never spread over the states. After every recovery the steps redone are the last
step heard before it minus the step resumed from; their time is the training time the lost launch had
spent on them. Time is measured (host clocks); money is that time x the plan's price, which is assumed
(a list price) unless the user gave --price.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.timeline import LOOP_STATES, TIMELINE, read_timeline
from orchestrator import runs

STATES = ("staging", "setup", "training", "evaluating", "checkpointing", "recovering", "idle")


@dataclass
class Recovery:
    heard: float  # unix time the lost launch was last heard of
    resumed: float  # unix time the next launch was training again
    resumed_step: int  # the checkpoint it resumed from
    last_step: int  # the last step heard before the loss
    redone_steps: int
    recovery_s: float  # heard -> training again: provisioning, setup, data, checkpoint load
    redone_s: float  # the training time the redone steps had taken
    automatic: bool  # within one job (SkyPilot recovered a preemption); False: `lmctl resume` after a crash
    # what recovery_s was spent on, measured: the lost nodes' last seconds, provisioning and the task's setup
    # (heard -> the new driver); staging; the data fetched to the new node; the checkpoint loaded; the rest
    # (Ray, building the model) is recovery_s minus these
    nodes_s: float = 0.0
    staging_s: float = 0.0
    data_s: float = 0.0
    restore_s: float = 0.0

    @property
    def lost_s(self) -> float:
        return (self.recovery_s if self.automatic else 0.0) + self.redone_s


@dataclass
class Accounting:
    wall_s: float  # the segments' time: what a cloud run rents
    seconds: dict[str, float]  # by STATES
    unaccounted_s: float  # wall_s minus the states: the live tail, or how far the clocks are from the wall
    recoveries: list[Recovery]
    tokens: int  # trained, at the last step heard
    step: int
    price_per_hour: float | None  # USD for all the run's GPUs; None for a local run
    plan: dict[str, Any] | None  # what the plan expected (Plan.summary()), with its assumptions
    spans: list[tuple[float, float, str]] = field(default_factory=list)  # (begin, end, state), in order
    live: bool = False  # its last segment is still open
    billed_s: float | None = None  # SkyPilot's job time where known: what the cost is reckoned on

    @property
    def lost_s(self) -> float:
        return sum(r.lost_s for r in self.recoveries)

    @property
    def redone_steps(self) -> int:
        return sum(r.redone_steps for r in self.recoveries)

    def dollars(self, seconds: float) -> float | None:
        return None if self.price_per_hour is None else self.price_per_hour * seconds / 3600

    @property
    def cost(self) -> float | None:
        return self.dollars(self.wall_s if self.billed_s is None else self.billed_s)

    @property
    def cost_basis(self) -> str:
        return "time since launch, measured" if self.billed_s is None else "SkyPilot's job time"

    @property
    def lost_cost(self) -> float | None:
        return self.dollars(self.lost_s)

    @property
    def tokens_per_usd(self) -> float | None:
        return self.tokens / self.cost if self.cost else None

    @property
    def usd_per_btok(self) -> float | None:
        return self.cost / self.tokens * 1e9 if self.cost is not None and self.tokens else None

    @property
    def planned_usd_per_btok(self) -> float | None:
        return (self.plan or {}).get("usd_per_btok")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recoveries"] = [asdict(r) | {"lost_s": r.lost_s} for r in self.recoveries]
        names = (
            "lost_s",
            "redone_steps",
            "cost",
            "cost_basis",
            "lost_cost",
            "tokens_per_usd",
            "usd_per_btok",
        )
        for name in names:
            out[name] = getattr(self, name)
        out["planned_usd_per_btok"] = self.planned_usd_per_btok
        out["measured"] = "time (host clocks)"
        out["assumed"] = self._assumed()
        return out

    def _assumed(self) -> list[str]:
        if self.price_per_hour is None:
            return []
        source = (self.plan or {}).get("price_source", "the plan's price")
        return [f"${self.price_per_hour:.2f}/h for the run's GPUs ({source})"]


def account(
    events: list[dict[str, Any]],
    segments: list[list[float | None]],
    price_per_hour: float | None = None,
    plan: dict[str, Any] | None = None,
    now: float | None = None,
    billed_s: float | None = None,
) -> Accounting:
    """The accounting of a run from its timeline `events` and `segments` ([started, ended or None]); an open
    segment runs to `now` (default: its last event)."""
    spans: list[tuple[float, float, str]] = []
    recoveries: list[Recovery] = []
    previous: _Launch | None = None  # the last launch of the run so far, across segments
    live = bool(segments) and segments[-1][1] is None
    wall = 0.0
    for began, ended in segments:
        inside = [e for e in events if began <= e["time"] and (ended is None or e["time"] <= ended + 1)]
        launches = _launches(inside)
        end = ended if ended is not None else (now if now is not None else _last_time(inside, began))
        wall += max(end - began, 0.0)
        cursor = began
        for j, launch in enumerate(launches):
            gap_state = "setup" if j == 0 else "recovering"
            cursor = _add(spans, cursor, launch.began, gap_state)
            cursor = _add(spans, cursor, launch.began + launch.staging_s, "staging")
            cursor = _add(spans, cursor, launch.time, gap_state)
            if previous is not None and (j > 0 or launch.start_step < previous.last_step):
                recoveries.append(_recovery(previous, launch, automatic=j > 0))
            cursor = _add_loop(spans, cursor, launch)
            previous = launch
        if launches and launches[-1].ended:
            cursor = _add(spans, cursor, end, "idle")
        elif ended is not None and launches:  # the last launch was lost and nothing followed in this job
            cursor = _add(spans, cursor, end, "recovering")
        elif ended is not None:  # no launch reached a step: a job that failed in setup or staging
            cursor = _add(spans, cursor, end, "setup")
    seconds = dict.fromkeys(STATES, 0.0)
    for b, e, state in spans:
        seconds[state] += e - b
    last = previous.last if previous else None
    return Accounting(
        wall_s=wall,
        seconds=seconds,
        unaccounted_s=wall - sum(seconds.values()),
        recoveries=recoveries,
        tokens=int(last.get("tokens", 0)) if last else 0,
        step=int(last.get("step", 0)) if last else 0,
        price_per_hour=price_per_hour,
        plan=plan,
        spans=spans,
        live=live,
        billed_s=billed_s,
    )


def of_run(path: Path, now: float | None = None) -> Accounting:
    """The accounting of the run in `path` (run.json and its timeline.jsonl, which a cloud run's refresh
    brings from the store)."""
    import time

    record = runs.read_record(path)
    events = read_timeline(path / TIMELINE)
    now = now or time.time()
    return account(events, record.segments, record.price_per_hour, record.plan, now, record.job_seconds)


# ---------------------------------------------------------------- internals


@dataclass
class _Launch:
    start: dict[str, Any]
    clocks: list[dict[str, Any]]  # its clock events and its end, in order

    @property
    def began(self) -> float:
        return float(self.start.get("began", self.start["time"]))

    @property
    def staging_s(self) -> float:
        return float(self.start.get("staging_s", 0.0))

    @property
    def time(self) -> float:
        return float(self.start["time"])

    @property
    def data_s(self) -> float:
        return float(self.start.get("data_s", 0.0))

    @property
    def restore_s(self) -> float:
        return float(self.start.get("restore_s", 0.0))

    @property
    def start_step(self) -> int:
        return int(self.start.get("start_step", 0))

    @property
    def last(self) -> dict[str, Any]:
        return self.clocks[-1] if self.clocks else {**self.start, "step": self.start_step}

    @property
    def last_step(self) -> int:
        return int(self.last.get("step", self.start_step))

    @property
    def heard(self) -> float:
        return float(self.last["time"])

    @property
    def ended(self) -> bool:
        return bool(self.clocks) and self.clocks[-1]["event"] == "end"

    def training_at(self, step: int) -> float:
        """Training seconds this launch had spent when it reached `step` (linear between its clocks)."""
        points = [(self.start_step, 0.0)] + [(int(c["step"]), c["seconds"]["training"]) for c in self.clocks]
        steps = [p[0] for p in points]
        k = bisect.bisect_left(steps, step)
        if k == 0:
            return 0.0
        if k >= len(points):
            return points[-1][1]
        (s0, t0), (s1, t1) = points[k - 1], points[k]
        return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)


def _launches(events: list[dict[str, Any]]) -> list[_Launch]:
    out: list[_Launch] = []
    for e in events:
        if e.get("event") == "start":
            out.append(_Launch(e, []))
        elif e.get("event") in ("clock", "end") and out:
            out[-1].clocks.append(e)
    return out


def _recovery(lost: _Launch, new: _Launch, automatic: bool) -> Recovery:
    redone = max(lost.last_step - new.start_step, 0)
    redone_s = lost.training_at(lost.last_step) - lost.training_at(new.start_step) if redone else 0.0
    return Recovery(
        heard=lost.heard,
        resumed=new.time,
        resumed_step=new.start_step,
        last_step=lost.last_step,
        redone_steps=redone,
        recovery_s=max(new.time - lost.heard, 0.0),
        redone_s=max(redone_s, 0.0),
        automatic=automatic,
        nodes_s=max(new.began - lost.heard, 0.0),
        staging_s=new.staging_s,
        data_s=new.data_s,
        restore_s=new.restore_s,
    )


def _add(spans: list[tuple[float, float, str]], cursor: float, until: float, state: str) -> float:
    """A span [cursor, until) of `state`, if it has length; the new cursor."""
    if until > cursor:
        spans.append((cursor, until, state))
        return until
    return cursor


def _add_loop(spans: list[tuple[float, float, str]], cursor: float, launch: _Launch) -> float:
    """The launch's loop, clock by clock: each interval split by how much each state grew in it (laid out in
    the order training, evaluating, checkpointing: a picture at clock resolution; the totals are exact)."""
    before = dict.fromkeys(LOOP_STATES, 0.0)
    for c in launch.clocks:
        for s in LOOP_STATES:
            cursor = _add(spans, cursor, cursor + max(c["seconds"].get(s, 0.0) - before[s], 0.0), s)
        before = {s: c["seconds"].get(s, 0.0) for s in LOOP_STATES}
    return cursor


def _last_time(events: list[dict[str, Any]], default: float) -> float:
    return max((float(e["time"]) for e in events), default=default)
