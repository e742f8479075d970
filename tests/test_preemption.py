"""Interruptions in the plan (orchestrator/preemption.py): the checkpoint interval, the expected preemptions
and spot against on-demand, each against arithmetic written out here; the table and the flags that replace
its figures; and what a launch writes from them (config.yaml's checkpoint_every, run.json's plan).

Everything is offline: launches are dry runs, and no SkyPilot API server may start.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from test_cloud_render import _offline  # noqa: F401 - autouse: no API server, no caller's LMCTL_* or endpoint

from model.config import load_spec, param_count, resolve
from model.errors import ConfigError
from orchestrator import preemption, runs
from orchestrator.cli import main
from orchestrator.gpus import CLOUDS, SPOT, parse_gpu, refusal
from orchestrator.launch import Hardware, launch, replan
from orchestrator.plan import make_plan, plan_renderable
from orchestrator.preemption import RATE, Assumptions, Workload, estimate, rates, spot_or_not

STORE = "s3://lmctl-test-bucket/prefix"
TABLE = {  # round numbers, so that the arithmetic below stays readable
    "as_of": "test",
    "sources": ["written out in this file"],
    "setup_s": 300,
    "store_mb_per_s": 100,
    "failure_mtbf_gpu_hours": 50000,
    "clouds": {
        "runpod": {RATE: 0.1, "provision_s": 300},
        "aws": {RATE: 0.05, "provision_s": 600},
        "gcp": {RATE: 0.1, "provision_s": 600},
        "lambda": {"provision_s": 600},
        "kubernetes": {"provision_s": 120},
    },
}
PRICES = {"prices": {"H100-SXM": {"aws": {"on_demand": 6.0, "spot": 3.0}}}}
# A run of 10^9 parameters, 10^10 tokens (uint16: 32768 ids), 100 hours of 2 s steps on 2 nodes x 8 GPUs
WORK = Workload(params=10**9, vocab_size=32768, token_budget=1e10, hours=100.0, step_s=2.0, nodes=2, world=16)
C = 12 * 10**9 / 100e6  # one checkpoint: 12 bytes a parameter over 100 MB/s = 120 s
RECOVERY = 600 + 300 + 1e10 * 2 / 100e6 + C  # provision + setup + 200 s data fetch + 120 s load = 1220 s


def _spot(assume: Assumptions | None = None):
    return estimate(WORK, rates(True, "aws", ["aws"], assume, TABLE), 3.0)


def _on_demand():
    return estimate(WORK, rates(False, "aws", ["aws"], None, TABLE), 6.0)


# ---------------------------------------------------------------- the arithmetic, by hand


def test_young_daly_interval_by_hand():
    mtbf_s = 1 / (2 * 0.05) * 3600  # 2 nodes x 0.05 preemptions a node-hour: one every 10 h
    tau = math.sqrt(2 * C * mtbf_s)  # sqrt(2 x 120 x 36000) = sqrt(8,640,000)
    assert (C, mtbf_s, RECOVERY) == (120.0, 36000.0, 1220.0) and tau == pytest.approx(2939.3877)
    p = _spot()
    assert (p.checkpoint_cost_s, p.mtbf_hours, p.state_bytes) == (C, 10.0, 12 * 10**9)
    assert p.interval_s == pytest.approx(tau) and p.interval_bound is None
    assert p.checkpoint_every == 1470  # 2939.4 s / 2 s a step
    assert p.interval_explain == "sqrt(2 x 120 s checkpoint x 10 h between interruptions) = 49 min"


def test_on_demand_interval_is_bounded_by_an_hour():
    """On demand, 16 GPUs fail every 50000 / 16 = 3125 h: sqrt(2 x 120 x 3125 x 3600) = 51,962 s, above the
    hour that bounds any interval."""
    p = _on_demand()
    assert p.mtbf_hours == 3125.0 and p.young_daly_s == pytest.approx(math.sqrt(2 * 120 * 3125 * 3600))
    assert (p.interval_s, p.checkpoint_every, p.interval_bound) == (3600.0, 1800, "at most 60 min")


def test_expected_preemptions_and_spot_saving_by_hand():
    spot, od = _spot(), _on_demand()
    tau = math.sqrt(2 * 120 * 36000)
    n = 100 / 10  # 100 hours at one preemption every 10 h
    lost = n * (RECOVERY + tau / 2) / 3600  # each: recovery + half an interval redone = 7.47 h in all
    assert (spot.expected, spot.recovery_s, spot.redone_s) == (n, RECOVERY, pytest.approx(tau / 2))
    assert (spot.start_s, spot.fetch_s, spot.load_s) == (900.0, 200.0, 120.0)
    assert spot.lost_hours == pytest.approx(lost) and lost == pytest.approx(7.4714, abs=1e-4)
    assert spot.lost_cost == pytest.approx(lost * 16 * 3.0)
    od_n = 100 / 3125  # on demand: 0.032 failures, each recovery + half an hour redone
    od_lost = od_n * (RECOVERY + 1800) / 3600
    assert od.expected == pytest.approx(od_n) and od.lost_hours == pytest.approx(od_lost)
    spot_cost, od_cost = (100 + lost) * 16 * 3.0, (100 + od_lost) * 16 * 6.0  # 5,158.63 and 9,602.58
    v = spot_or_not(WORK, spot, 3.0, od, 6.0, "hand")
    assert (v.spot_cost, v.on_demand_cost) == (pytest.approx(spot_cost), pytest.approx(od_cost))
    assert v.verdict == "spot saves $4,444 (46%) for this run"


def test_on_demand_wins_when_spot_is_preempted_often():
    """0.5 preemptions a node-hour on 2 nodes: one an hour, 100 of them, each 1220 s + 465 s lost."""
    spot = _spot(Assumptions(preemptions_per_hour=0.5))
    tau = math.sqrt(2 * 120 * 3600)  # 929.5 s
    lost = 100 * (RECOVERY + tau / 2) / 3600  # 46.8 h
    assert (spot.mtbf_hours, spot.expected) == (1.0, 100.0) and spot.lost_hours == pytest.approx(lost)
    spot_cost = (100 + lost) * 16 * 5.5  # 12,918.30 at $5.50, against on-demand's 9,602.58 at $6
    v = spot_or_not(WORK, spot, 5.5, _on_demand(), 6.0, "hand")
    assert v.spot_cost == pytest.approx(spot_cost) and v.on_demand_cost == pytest.approx(9602.577, abs=1e-3)
    assert v.verdict == "on-demand is cheaper for this run (spot costs $3,316 more)"


def test_a_rate_faster_than_recovery_is_warned_about():
    p = _spot(Assumptions(preemptions_per_hour=30))  # 2 nodes: one every minute, recovery takes 20
    assert p.warning() is not None and "may not end" in p.warning()
    assert _spot().warning() is None


def test_plan_carries_the_same_arithmetic():
    """make_plan on 124m, 2 nodes x 8 H100 on aws spot: its figures are the hand formulas from its own
    hours and step time."""
    spec = resolve("124m")
    plan = make_plan(
        spec, parse_gpu("H100-SXM:8"), 2, cloud="aws", spot=True, prices=PRICES, preemption_table=TABLE
    )
    n = param_count(spec.model)
    c = 12 * n / 100e6
    tau = math.sqrt(2 * c * 36000)
    step_s = 524288 / plan.tokens_per_s
    p = plan.preemption
    assert p.checkpoint_cost_s == pytest.approx(c) and p.interval_s == pytest.approx(tau)
    assert p.step_s == pytest.approx(step_s) and p.checkpoint_every == round(tau / step_s)
    assert p.expected == pytest.approx(plan.hours / 10)
    recovery = 900 + 20 * n * 2 / 100e6 + c  # the budget: 20 tokens a parameter, 2 bytes each
    assert p.recovery_s == pytest.approx(recovery)
    assert p.versus.on_demand_price == 6.0 and p.versus.on_demand_source == "prices.yaml aws on-demand"
    summary = json.loads(json.dumps(plan.summary()))
    keys = {
        "tokens_per_s",
        "mfu",
        "hours",
        "cost",
        "usd_per_btok",
        "price_per_gpu_hour",
        "price_source",
        "spot",
    }
    keys |= {"mtbf_hours", "checkpoint_interval_s", "checkpoint_every", "checkpoint_cost_s", "recovery_s"}
    keys |= {"expected_preemptions", "expected_lost_hours", "expected_lost_cost", "assumed"}
    assert keys <= set(summary)
    assert summary["usd_per_btok"] == pytest.approx(plan.cost / plan.token_budget * 1e9)
    assert summary["mtbf_hours"] == 10.0 and summary["checkpoint_every"] == p.checkpoint_every
    assert "0.05 spot preemptions per node-hour (preemption.yaml aws)" in summary["assumed"]
    assert "$3.00 per GPU-hour (prices.yaml aws spot)" in summary["assumed"]


def test_no_cloud_and_no_price_source_assumes_the_worst_cloud():
    r = rates(True, None, ["runpod", "aws", "gcp"], None, TABLE)
    assert r.cloud == "gcp" and r.per_node_hour == 0.1 and "the worst of the clouds" in r.assumed[0]
    assert rates(False, None, ["runpod", "kubernetes"], None, TABLE).provision_s == 300


# ---------------------------------------------------------------- the flags and the table


def test_flags_replace_the_table():
    r = rates(True, "aws", ["aws"], Assumptions("0.2", "10", "50"), TABLE)
    assert (r.per_node_hour, r.start_s, r.provision_s, r.setup_s, r.store_mb_per_s) == (
        0.2,
        600,
        None,
        None,
        50,
    )
    text = " ".join(r.assumed)
    assert "--preemptions-per-hour" in text and "--recovery-minutes" in text and "--store-mbps" in text
    assert "preemption.yaml" not in text
    p = estimate(WORK, r, 3.0)
    assert p.mtbf_hours == pytest.approx(1 / (2 * 0.2)) and p.checkpoint_cost_s == 12 * 10**9 / 50e6


def test_plan_flags_reach_the_json(capsys):
    argv = ["plan", "--gpu", "H100:8", "--cloud", "aws", "--spot", "--config", "124m", "--json"]
    assert (
        main([*argv, "--preemptions-per-hour", "0.2", "--recovery-minutes", "10", "--store-mbps", "50"]) == 0
    )
    plan = json.loads(capsys.readouterr().out)
    p = plan["preemption"]
    assert (p["per_node_hour"], p["mtbf_hours"], p["start_s"], p["store_mb_per_s"]) == (0.2, 5.0, 600.0, 50.0)
    assert "0.2 spot preemptions per node-hour (--preemptions-per-hour)" in plan["assumed"]
    assert p["versus"]["verdict"].startswith(("spot saves", "on-demand is cheaper"))


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--preemptions-per-hour", "abc"),
        ("--preemptions-per-hour", "0"),
        ("--preemptions-per-hour", "61"),
        ("--recovery-minutes", "-5"),
        ("--recovery-minutes", "nan"),
        ("--store-mbps", "inf"),
        ("--store-mbps", "0"),
    ],
)
def test_bad_flags_are_one_line(capsys, tmp_path, flag, value):
    assert main(["plan", "--gpu", "H100", "--config", "tiny", "--spot", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} '{value}': give ") and err.count("\n") == 1, err
    root = tmp_path / "runs"
    argv = [
        "launch",
        "--gpu",
        "H100",
        "--config",
        "tiny",
        "--store",
        STORE,
        "--dry-run",
        "--runs-dir",
        str(root),
    ]
    assert main([*argv, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} '{value}'") and err.count("\n") == 1, err
    assert not root.exists() or list(root.iterdir()) == []


def test_the_flags_are_for_cloud_launches(capsys, tmp_path):
    argv = ["launch", "--mode", "local", "--config", "tiny", "--dry-run", "--runs-dir", str(tmp_path)]
    assert main([*argv, "--recovery-minutes", "5"]) == 2
    assert (
        capsys.readouterr().err
        == "error: --recovery-minutes is for cloud runs: add --gpu, e.g. --gpu RTX5090\n"
    )


def test_the_shipped_table_is_what_the_plan_assumes():
    table = preemption.load_table()
    assert table["as_of"] == "2026-12" and len(table["sources"]) >= 3
    assert (table["setup_s"], table["store_mb_per_s"], table["failure_mtbf_gpu_hours"]) == (300, 100, 50000)
    assert {c: row.get(RATE) for c, row in table["clouds"].items()} == {
        "runpod": 0.1,
        "aws": 0.05,
        "gcp": 0.1,
        "lambda": None,
        "kubernetes": None,
    }
    for cloud in CLOUDS:  # a spot rate exactly where lmctl lets a run use spot (orchestrator/gpus.py)
        assert (RATE in table["clouds"][cloud]) == (refusal(cloud, SPOT) is None), cloud


def _broken(table: dict, path: list[str], value) -> dict:
    out = json.loads(json.dumps(table))
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


@pytest.mark.parametrize(
    "path, value, fragment",
    [
        (["setup_s"], None, "setup_s: missing"),
        (["store_mb_per_s"], 0, "store_mb_per_s: 0 must be a number > 0"),
        (["failure_mtbf_gpu_hours"], "many", "failure_mtbf_gpu_hours: 'many' must be a number > 0"),
        (["sources"], [], "sources: give a list"),
        (["extra"], 1, "extra: unknown key"),
        (["clouds", "aws", RATE], -1, f"clouds.aws.{RATE}: -1 must be a number > 0"),
        (["clouds", "runpod", RATE], None, f"clouds.runpod.{RATE}: missing"),
        (["clouds", "lambda", RATE], 0.1, f"clouds.lambda.{RATE}: unknown key; allowed: provision_s"),
        (["clouds", "gcp"], None, "clouds.gcp: missing"),
        (["clouds", "vast"], {"provision_s": 1}, "clouds.vast: unknown key"),
        (["clouds", "kubernetes", "provision_s"], True, "clouds.kubernetes.provision_s: True must be"),
    ],
)
def test_a_bad_table_is_one_line_naming_the_key(tmp_path, path, value, fragment):
    file = tmp_path / "preemption.yaml"
    file.write_text(yaml.safe_dump(_broken(TABLE, path, value)))
    with pytest.raises(ConfigError) as e:
        preemption.load_table(file)
    assert str(e.value).startswith(f"{file}: ") and fragment in str(e.value) and "\n" not in str(e.value)


def test_an_unreadable_table_is_one_line(tmp_path):
    file = tmp_path / "preemption.yaml"
    file.write_text("clouds: [unclosed\n  setup_s: 1\n")
    with pytest.raises(ConfigError) as e:
        preemption.load_table(file)
    assert str(e.value).startswith(f"cannot read the preemption table {file}") and "\n" not in str(e.value)
    preemption.load_table(_written(tmp_path, TABLE))  # the good one loads


def _written(tmp_path, table: dict):
    file = tmp_path / "good.yaml"
    file.write_text(yaml.safe_dump(table))
    return file


# ---------------------------------------------------------------- rendering


def test_rendering_shows_the_arithmetic_and_what_is_assumed():
    from rich.console import Console

    console = Console(record=True, width=200)
    spot = make_plan(resolve("1b"), parse_gpu("H100-SXM:8"), cloud="aws", spot=True, preemption_table=TABLE)
    console.print(plan_renderable(spot))
    text = " ".join(console.export_text().split())
    for fragment in (
        "checkpoints every",
        "sqrt(2 x 147 s checkpoint x 20 h between interruptions)",
        "preemptions",
    ):
        assert fragment in text, fragment
    assert "1 / (1 node x 0.05 per node-hour)" in text and "spot saves" in text
    assert "0.05 spot preemptions per node-hour (preemption.yaml aws)" in text and "assumed 40% MFU" in text
    console = Console(record=True, width=200)
    console.print(plan_renderable(make_plan(resolve("1b"), parse_gpu("H100-SXM:8"), preemption_table=TABLE)))
    text = " ".join(console.export_text().split())
    assert "failures" in text and "50,000 GPU-hours / 8 GPUs" in text and "spot?" not in text


# ---------------------------------------------------------------- what a launch writes


def _cloud(tmp_path, name: str, overrides=(), preset: str = "1b", hw: Hardware | None = None):
    hw = hw or Hardware("H100-SXM:8", cloud="aws", spot=True)
    return launch(preset, list(overrides), name=name, hardware=hw, dry_run=True, store=STORE, root=tmp_path)


def test_a_cloud_launch_checkpoints_at_the_planned_interval(tmp_path):
    path = _cloud(tmp_path, "auto").path
    t = load_spec(path / runs.CONFIG).train
    plan = runs.read_record(path).plan
    c = 12 * param_count(resolve("1b").model) / 100e6  # 147.48 s at the shipped 100 MB/s
    assert (t.checkpoint_every, t.mtbf_hours, t.checkpoint_cost_s) == (
        "auto",
        20.0,
        147.5,
    )  # 1 / 0.05 an hour
    assert (
        plan["spot"] is True and plan["mtbf_hours"] == 20.0 and plan["checkpoint_cost_s"] == pytest.approx(c)
    )
    assert plan["price_per_gpu_hour"] * 8 == pytest.approx(runs.read_record(path).price_per_hour)
    assert plan["expected_preemptions"] == pytest.approx(plan["hours"] / 20.0)
    assert "0.05 spot preemptions per node-hour (preemption.yaml aws)" in plan["assumed"]


def test_a_users_own_interval_settings_are_kept(tmp_path):
    t = load_spec(_cloud(tmp_path, "forty", ["train.checkpoint_every=40"]).path / runs.CONFIG).train
    assert (t.checkpoint_every, t.mtbf_hours, t.checkpoint_cost_s) == (40, None, None)
    over = ["train.checkpoint_every=auto", "train.mtbf_hours=3"]
    t = load_spec(_cloud(tmp_path, "three", over).path / runs.CONFIG).train
    assert (t.checkpoint_every, t.mtbf_hours, t.checkpoint_cost_s) == ("auto", 3.0, 147.5)
    own = tmp_path / "mine.yaml"  # a config file of the user's: its number is a choice, not a default
    raw = yaml.safe_load(resolve("tiny").to_yaml())
    raw["train"]["checkpoint_every"] = 77
    own.write_text(yaml.safe_dump(raw))
    t = load_spec(_cloud(tmp_path, "own", preset=str(own), hw=Hardware("H100-SXM")).path / runs.CONFIG).train
    assert t.checkpoint_every == 77


def test_a_local_launch_keeps_the_presets_number_unless_told_auto(tmp_path, monkeypatch):
    monkeypatch.setattr("orchestrator.sanity.local_gpu_names", lambda: [])  # a CPU: one device
    path = launch("tiny", [], name="fixed", dry_run=True, root=tmp_path).path
    t = load_spec(path / runs.CONFIG).train
    assert (t.checkpoint_every, t.mtbf_hours, runs.read_record(path).plan) == (50, None, None)
    path = launch("tiny", ["train.checkpoint_every=auto"], name="auto", dry_run=True, root=tmp_path).path
    t = load_spec(path / runs.CONFIG).train
    cost = 12 * param_count(resolve("tiny").model) / 100e6  # 0.126 s, written to 4 significant digits
    assert (t.checkpoint_every, t.mtbf_hours, t.checkpoint_cost_s) == ("auto", 50000.0, float(f"{cost:.4g}"))
    monkeypatch.setattr("orchestrator.sanity.local_gpu_names", lambda: ["NVIDIA H100 80GB HBM3"] * 4)
    path = launch("tiny", ["train.checkpoint_every=auto"], name="gpus", dry_run=True, root=tmp_path).path
    assert load_spec(path / runs.CONFIG).train.mtbf_hours == 12500.0  # 50000 GPU-hours / 4 GPUs


def test_a_move_replans_the_interval_but_keeps_the_users(tmp_path):
    """Resumed on other hardware (spot -> on-demand), the numbers the last plan wrote follow the new plan;
    a number the user set stays."""
    for name, over, mtbf in (("planned", [], 50000 / 8), ("users", ["train.mtbf_hours=3"], 3.0)):
        path = _cloud(tmp_path, name, over).path
        record, spec = runs.read_record(path), load_spec(path / runs.CONFIG)
        moved = replan(path, record, spec, 0, Hardware("H100-SXM:8", cloud="aws"), None, None, None)
        assert (moved.train.checkpoint_every, moved.train.mtbf_hours) == ("auto", mtbf), name
        plan = runs.read_record(path).plan
        assert plan["spot"] is False and plan["mtbf_hours"] == 50000 / 8 and plan["spot_verdict"] is None
