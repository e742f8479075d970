"""Where a run's time and money went (orchestrator/accounting.py), against sums done by hand; and
checkpoint_every=auto in a real loop choosing Young/Daly's interval from its own first commit."""

from __future__ import annotations

import json
import math

import pytest

from model.checkpoint_interval import AutoCheckpoints, choose, young_daly_s
from model.timeline import read_timeline
from orchestrator.accounting import account


def clock(
    t: float, step: int, training: float, evaluating: float = 0.0, checkpointing: float = 0.0, end=False
):
    seconds = {"training": training, "evaluating": evaluating, "checkpointing": checkpointing}
    return {
        "event": "end" if end else "clock",
        "time": t,
        "step": step,
        "tokens": step * 1000,
        "seconds": seconds,
    }


def start(t: float, began: float, staging_s: float, step: int, **measured: float):
    return {
        "event": "start",
        "time": t,
        "began": began,
        "staging_s": staging_s,
        "start_step": step,
        **measured,
    }


def test_a_job_preempted_once_by_hand():
    """Submitted at 1000. Launch 1: driver at 1100, staged 20 s, first step at 1150; clocks to step 50 at
    1250 (80 s training, 15 eval, 5 checkpointing); lost there. Launch 2 (same job): driver at 1400, staged
    0, first step at 1430 from step 40; ends at step 100 at 1530 (90 + 6 + 4); job over at 1540."""
    events = [
        start(1150, 1100, 20, 0),
        clock(1200, 25, 40),
        clock(1250, 50, 80, 15, 5),
        start(1430, 1400, 0, 40, data_s=12, restore_s=7),
        clock(1530, 100, 90, 6, 4, end=True),
    ]
    acc = account(events, [[1000.0, 1540.0]], price_per_hour=3.6, plan={"usd_per_btok": 40.0})
    s = acc.seconds
    assert s["setup"] == pytest.approx(100 + 30)  # submit -> driver, driver -> first step less staging
    assert s["staging"] == pytest.approx(20)
    assert s["training"] == pytest.approx(80 + 90)
    assert s["evaluating"] == pytest.approx(15 + 6) and s["checkpointing"] == pytest.approx(5 + 4)
    assert s["recovering"] == pytest.approx(1430 - 1250)  # last heard -> training again
    assert s["idle"] == pytest.approx(10)
    assert (
        acc.wall_s == 540 and sum(s.values()) == pytest.approx(540) and acc.unaccounted_s == pytest.approx(0)
    )

    [r] = acc.recoveries
    assert (r.resumed_step, r.last_step, r.redone_steps, r.automatic) == (40, 50, 10, True)
    # launch 1 trained steps 25 -> 50 in 40 s of training: steps 40 -> 50 took 16 s
    assert r.redone_s == pytest.approx(16) and r.recovery_s == pytest.approx(180)
    # of which: the lost node's last seconds, new nodes and setup (1250 -> 1400), data 12 s, checkpoint 7 s
    assert (r.nodes_s, r.data_s, r.restore_s) == (pytest.approx(150), 12, 7)
    assert acc.lost_s == pytest.approx(196)
    assert acc.cost == pytest.approx(3.6 * 540 / 3600) and acc.lost_cost == pytest.approx(3.6 * 196 / 3600)
    assert acc.tokens == 100_000 and acc.usd_per_btok == pytest.approx(0.54 / 100_000 * 1e9)
    assert acc.planned_usd_per_btok == 40.0
    assert acc.to_dict()["assumed"] and acc.to_dict()["cost_basis"] == "time since launch, measured"


def test_a_crash_resumed_by_hand_is_redone_work_but_not_a_rented_gap():
    """A local run killed after step 30 (checkpoint 20), resumed by `lmctl resume` an hour later: the hour
    between its segments is nobody's time; the 10 steps are redone."""
    events = [start(10, 5, 0, 0), clock(40, 30, 30), start(3620, 3610, 0, 20), clock(3650, 50, 30, end=True)]
    acc = account(events, [[0.0, 45.0], [3600.0, 3655.0]])
    assert acc.wall_s == pytest.approx(45 + 55)
    [r] = acc.recoveries
    assert (r.automatic, r.redone_steps, r.redone_s) == (False, 10, pytest.approx(10))
    assert acc.lost_s == pytest.approx(10)  # the redone work; the gap was not rented
    assert acc.seconds["recovering"] == pytest.approx(5)  # the lost launch's last 5 s of its segment
    assert acc.cost is None and acc.lost_cost is None  # a local run has no price


def test_a_live_run_counts_its_tail_as_unaccounted_until_the_next_clock():
    acc = account([start(10, 0, 0, 0), clock(20, 10, 10)], [[0.0, None]], now=50.0)
    assert acc.live and acc.wall_s == 50 and acc.unaccounted_s == pytest.approx(30)


def test_young_daly_by_hand():
    """C = 147 s, M = 20 h: sqrt(2 x 147 x 72000) = 4600.9 s, above the 1 h bound; C = 30 s, M = 5 h:
    sqrt(2 x 30 x 18000) = 1039.2 s, 416 steps of 2.5 s; a cost above the optimum is the interval."""
    assert young_daly_s(147, 72000) == pytest.approx(4600.87, abs=0.01)
    bounded = choose(147, 72000)
    assert (bounded.seconds, bounded.bound) == (3600.0, "at most 60 min")
    free = choose(30, 18000)
    assert free.seconds == pytest.approx(math.sqrt(2 * 30 * 18000)) and free.bound is None
    assert free.steps(2.5) == round(1039.23 / 2.5) == 416
    slow = choose(600, 200)  # sqrt(2 x 600 x 200) = 490 s < one 600 s commit
    assert (slow.seconds, slow.bound) == (600, "one commit")


def test_auto_checkpoints_measure_first_then_keep_the_first_measurement():
    auto = AutoCheckpoints(mtbf_s=3600, estimate_s=None)
    auto.update(step_s=1.0)
    assert auto.every == 1 and auto.due(1)  # nothing known: save once to measure
    auto.saved(1)
    auto.update(step_s=1.0)
    assert auto.every is None and not auto.due(50)  # no second save before the first has committed
    auto.committed(8.0)
    auto.committed(50.0)  # later commits do not change the cost
    auto.update(step_s=2.0)
    assert auto.cost_s == 8.0 and auto.every == round(math.sqrt(2 * 8 * 3600) / 2.0) == 120
    assert not auto.due(120) and auto.due(121)
    assert not auto.update(step_s=2.2) and auto.every == 120  # 109 steps: within 25%, jitter, kept
    assert auto.update(step_s=4.0) and auto.every == 60  # the steps got slower: half as many


@pytest.mark.slow
def test_the_loop_checkpoints_at_young_daly_s_interval_from_its_first_commit(tmp_path):
    """A real CPU run with checkpoint_every=auto and a short MTBF: it saves once to measure, then every
    `interval` steps, where interval is what choose() gives for that measured cost and its step time."""
    from model.config import resolve
    from model.train import main

    run = tmp_path / "auto"
    args = ["--config", "tiny", "--run-dir", str(run), "--device", "cpu"]
    for o in ("train.steps=60", "train.log_every=5", "train.evals=[]", "train.samples=[]"):
        args += ["--override", o]
    args += ["--override", "train.checkpoint_every=auto", "--override", "train.mtbf_hours=0.002"]
    assert main(args) == 0
    events = read_timeline(run / "timeline.jsonl")
    intervals = [e for e in events if e["event"] == "interval"]
    assert intervals and all(e["cost"] == "measured" for e in intervals)
    for e in intervals:
        assert e["every"] == choose(e["cost_s"], e["mtbf_s"]).steps(e["step_s"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    saved = [r["checkpoint"] for r in metrics if "checkpoint" in r]
    assert saved[0] == 5  # at the first log step, to measure the cost
    for before, after in zip(saved[1:], saved[2:-1], strict=False):  # the last one is the run's end
        announced = {e["every"] for e in intervals if e["step"] <= after}
        assert after - before in announced, (saved, intervals)
    assert len(saved) >= 4  # the interval is a few steps at this MTBF: the test checks something
    assert resolve("tiny").train.checkpoint_every == 50  # a preset keeps its number: auto is asked for
