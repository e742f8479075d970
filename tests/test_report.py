"""`lmctl report`: the folder of a run's story, from run folders composed by hand.

A composed cloud run: 6,000 steps on 8 GPUs at a price, last heard at step 2,200 (preempted; SkyPilot
recovers it in the same job, from the checkpoint at 2,000) and at 4,100 (the job fails; `lmctl resume`
restarts it from 4,000 in a second segment). The report's figures must be Accounting's, every $ labelled,
the PNGs real.
"""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from model.config import resolve
from orchestrator import accounting, runs
from orchestrator.cli import main
from orchestrator.report import write_report

T0 = 1_750_000_000.0  # 2025-06-15: the first segment's start
STEPS, LOG_EVERY, CKPT_EVERY, EVAL_EVERY = 6000, 50, 500, 1000
BATCH_TOKENS = 524_288
STEP_S, EVAL_S, CKPT_S = 1.3, 30.0, 20.0
PRICE = 20.0  # USD/h for the 8 GPUs
TASKS = {"hellaswag": 0.25, "arc_easy": 0.25}


def plan_summary() -> dict:
    tps = 420_000.0
    hours = STEPS * BATCH_TOKENS / tps / 3600
    return {
        "gpu": "H100",
        "world": 8,
        "cloud": "runpod",
        "token_budget": STEPS * BATCH_TOKENS,
        "tokens_per_s": tps,
        "mfu": 0.4,
        "hours": hours,
        "cost": hours * PRICE,
        "usd_per_btok": hours * PRICE / (STEPS * BATCH_TOKENS) * 1e9,
        "price_per_gpu_hour": PRICE / 8,
        "price_source": "prices.yaml runpod spot",
        "spot": True,
        "mtbf_hours": 3.0,
        "checkpoint_interval_s": 650.0,
        "checkpoint_every": CKPT_EVERY,
        "checkpoint_cost_s": 15.0,
        "expected_preemptions": 0.8,
        "expected_lost_hours": 0.15,
        "expected_lost_cost": 0.15 * PRICE,
        "recovery_s": 300.0,
        "assumed": [
            "40% MFU (--mfu)",
            "$2.50 per GPU-hour (prices.yaml runpod spot)",
            "MTBF 3 h (preemption.yaml)",
        ],
    }


class Composer:
    """Writes what a real run would have written: timeline events per launch, metrics of the one history."""

    def __init__(self, mfu: bool):
        self.events: list[dict] = []
        self.metrics: dict[int, list[dict]] = {}  # step -> its records (a resume cuts back: later ones win)
        self.mfu = mfu

    def launch(self, began: float, staging_s: float, setup_s: float, start_step: int, until: int, ends: bool):
        """One launch: trains from began + staging_s + setup_s at start_step; heard last at step `until`."""
        t = began + staging_s + setup_s
        tokens = start_step * BATCH_TOKENS
        self.events.append(
            {
                "event": "start",
                "began": began,
                "staging_s": staging_s,
                "start_step": start_step,
                "tokens": tokens,
                "time": t,
            }
        )
        for step in range(start_step + 1, until + 1):
            self.metrics.pop(step, None)  # redone: metrics.jsonl was cut back to the checkpoint
        seconds = {"training": 0.0, "evaluating": 0.0, "checkpointing": 0.0}
        for step in range(start_step + LOG_EVERY, until + 1, LOG_EVERY):
            seconds["training"] += LOG_EVERY * STEP_S * (1 + 0.04 * math.sin(step / 170))
            now = t + sum(seconds.values())
            self._train_record(
                step, now, LOG_EVERY * BATCH_TOKENS / (LOG_EVERY * STEP_S * (1 + 0.04 * math.sin(step / 170)))
            )
            if step % CKPT_EVERY == 0:
                seconds["evaluating"] += EVAL_S
                self._eval_records(step, t + sum(seconds.values()))
                seconds["checkpointing"] += CKPT_S
                self.metrics.setdefault(step, []).append(
                    {
                        "step": step,
                        "checkpoint": step,
                        "checkpoint_s": CKPT_S,
                        "time": t + sum(seconds.values()),
                    }
                )
            event = "end" if ends and step == until else "clock"
            rec = {"event": event, "step": step, "tokens": step * BATCH_TOKENS, "seconds": dict(seconds)}
            self.events.append({**rec, "time": t + sum(seconds.values())})
        return t + sum(seconds.values())  # the last time heard

    def _train_record(self, step: int, now: float, tps: float) -> None:
        loss = 2.8 + 8.0 / math.sqrt(1 + step / 40)
        rec = {"step": step, "loss": loss, "lr": 3e-4, "grad_norm": 0.9, "tokens": step * BATCH_TOKENS}
        rec |= {"tokens_per_s": tps, "mfu": tps / 420_000 * 0.4 if self.mfu else None, "time": now}
        self.metrics.setdefault(step, []).append(rec)

    def _eval_records(self, step: int, now: float) -> None:
        val = {
            "step": step,
            "val_loss": 2.9 + 8.0 / math.sqrt(1 + step / 40),
            "val_ppl": 30.0,
            "val_bpb": 1.1,
        }
        self.metrics.setdefault(step, []).append({**val, "time": now})
        if step % EVAL_EVERY == 0:
            scores = {
                task: {
                    "acc": chance + 0.01 * step / 1000 + 0.004 * i,
                    "acc_norm": chance + 0.012 * step / 1000,
                    "chance": chance,
                    "n": 500,
                }
                for i, (task, chance) in enumerate(TASKS.items())
            }
            self.metrics[step].append({"step": step, "evals": scores, "time": now})

    def write(self, path: Path) -> None:
        lines = [json.dumps(r) for step in sorted(self.metrics) for r in self.metrics[step]]
        (path / runs.METRICS).write_text("\n".join(lines) + "\n")
        (path / "timeline.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.events))


def new_run(root: Path, name: str, mode: str, price: float | None, plan: dict | None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    record = runs.new_record(name, mode, "finished", "1b", "file:///tmp/store", 1, resolve("tiny"))
    record.steps, record.global_batch_tokens, record.launches = STEPS, BATCH_TOKENS, 2
    if mode == "cloud":
        record.gpu, record.nodes, record.spot, record.cloud = "H100:8", 1, True, "runpod"
    record.price_per_hour, record.plan = price, plan
    runs.write_record(path, record)
    return path


def compose_cloud_run(root: Path, name: str = "big", price: float | None = PRICE, mfu: bool = True) -> Path:
    """Two segments: a launch, an automatic recovery in the same job, a failure, then `lmctl resume`."""
    path = new_run(root, name, "cloud", price, plan_summary() if price is not None else None)
    c = Composer(mfu)
    heard = c.launch(T0 + 240, 90.0, 60.0, 0, 2200, ends=False)  # preempted after its clock at step 2200
    heard = c.launch(heard + 420, 0.0, 110.0, 2000, 4100, ends=False)  # SkyPilot brought it back
    first_ended = heard + 45  # the job failed
    resumed = first_ended + 1800  # half an hour later, `lmctl resume`
    done = c.launch(resumed + 200, 0.0, 80.0, 4000, STEPS, ends=True)
    c.write(path)
    runs.update_record(path, segments=[[T0, first_ended], [resumed, done + 25]])
    return path


def compose_local_run(root: Path, name: str = "dev") -> Path:
    """A CPU run here: no price, no plan, no MFU; one launch that finished."""
    path = new_run(root, name, "local", None, None)
    c = Composer(mfu=False)
    done = c.launch(T0 + 5, 3.0, 4.0, 0, STEPS, ends=True)
    c.write(path)
    runs.update_record(path, segments=[[T0, done + 2]])
    return path


def blocks(markdown: str) -> list[str]:
    return [b for b in markdown.split("\n\n") if b.strip()]


# ---------------------------------------------------------------- the folder


def test_a_cloud_run_reports_accountings_figures_each_labelled(tmp_path):
    path = compose_cloud_run(tmp_path)
    out = write_report(path)
    assert out == path / "report"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.md", "report.json", "loss.png", "speed.png", "cost.png"]
    )
    acc = accounting.of_run(path)
    assert len(acc.recoveries) == 2 and acc.redone_steps == 200 + 100  # the composition is what it says

    md = (out / "report.md").read_text()
    assert "## Recoveries (2)" in md
    assert f"| **all** |  |  |  | {acc.redone_steps:,} |" in md
    assert f"${acc.lost_cost:,.2f}" in md and f"${acc.cost:,.2f}" in md
    assert f"${acc.usd_per_btok:,.2f}" in md
    for r in acc.recoveries:  # each row: resumed step, last step heard, redone steps
        assert f"| {r.resumed_step:,} | {r.last_step:,} | {r.redone_steps:,} |" in md
    assert "1 recovered automatically, 1 by lmctl resume" in md
    for block in blocks(md):  # every $ figure sits in a table or sentence that says how it was reached
        if "$" in block:
            assert "assumed" in block, block
    for line in md.splitlines():
        if line.startswith(("| $", "| lost $")):  # the plan's money rows say so in their own line
            assert "assumed" in line, line
            assert "per hour" in line or ("planned" in line and "measured" in line), line

    facts = json.loads((out / "report.json").read_text())
    assert facts["cost"] == pytest.approx(acc.cost) and len(facts["recoveries"]) == 2
    assert facts["assumed"] == ["$20.00/h for the run's GPUs (prices.yaml runpod spot)"]


def test_the_total_is_the_accountings_on_skypilots_job_time_when_known(tmp_path):
    path = compose_cloud_run(tmp_path)
    runs.update_record(path, job_seconds=9000.0)  # what SkyPilot says the job ran: $50.00 at $20/h
    md = (write_report(path) / "report.md").read_text()
    assert "| $ total | $41.61 | $50.00 | planned: estimate at an assumed price; happened: SkyPilot's" in md
    assert "The $ total, $50.00 (price assumed), is reckoned on SkyPilot's job time (9,000 s" in md


def test_pngs_are_real_images_of_a_readable_size(tmp_path):
    out = write_report(compose_cloud_run(tmp_path))
    for name in ("loss.png", "speed.png", "cost.png"):
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            width, height = img.size
            colours = len(set(img.convert("RGB").resize((100, 50)).getdata()))
        assert 700 <= width <= 2000 and 400 <= height <= 1200, (name, img.size)
        assert colours > 20, name  # something was drawn, not a blank canvas


def test_a_local_run_is_reported_in_hours_never_in_dollars(tmp_path):
    out = write_report(compose_local_run(tmp_path))
    md = (out / "report.md").read_text()
    assert "$" not in md
    assert "hours (measured)" in md and "## Recoveries" in md and "None: no launch was lost." in md
    assert "No plan was recorded" in md
    acc = accounting.of_run(tmp_path / "dev")
    assert f"| **wall** | {acc.wall_s:,.0f} | 100.0% | {acc.wall_s / 3600:,.2f} |" in md
    assert json.loads((out / "report.json").read_text())["cost"] is None


def test_a_run_from_before_time_accounting_says_so_rather_than_zero(tmp_path):
    path = compose_cloud_run(tmp_path, "old")
    (path / "timeline.jsonl").unlink()
    runs.update_record(path, segments=[])
    md = (write_report(path) / "report.md").read_text()
    assert "Time not recorded: run.json has no segments" in md and "Recoveries\n\nUnknown" in md
    assert "| $ total | $41.61 | - |" in md and "$0.00" not in md  # unknown, not free


def test_a_report_replaces_a_report_and_refuses_other_folders(tmp_path):
    path = compose_local_run(tmp_path)
    out = write_report(path, tmp_path / "elsewhere" / "rep")
    (out / "loss.png").write_bytes(b"stale")
    assert write_report(path, out) == out
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["rep"]  # no temporary folder left

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["report", "dev", "--runs-dir", str(tmp_path), "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- the verb


def one_line_error(capsys, fragment: str) -> None:
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert "\n" not in err and "Traceback" not in err


def test_the_verb_prints_the_folder_or_its_json(tmp_path, capsys):
    compose_local_run(tmp_path)
    assert main(["report", "dev", "--runs-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "dev" / "report")
    assert main(["report", "dev", "--runs-dir", str(tmp_path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["folder"] == str(tmp_path / "dev" / "report") and facts["run"] == "dev"
    assert "cost.png" in facts["files"] and facts["price_per_hour"] is None


def test_an_unknown_run_is_one_line(tmp_path, capsys):
    compose_local_run(tmp_path)
    assert main(["report", "ghost", "--runs-dir", str(tmp_path)]) == 2
    one_line_error(capsys, "no run named 'ghost'")


def test_a_run_without_metrics_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = new_run(tmp_path, "fresh", "local", None, None)
    (path / runs.METRICS).write_text(json.dumps({"step": 0, "checkpoint": 0}) + "\n")
    assert main(["report", "fresh", "--runs-dir", str(tmp_path)]) == 2
    one_line_error(capsys, "run fresh has no metrics yet")
    assert not (path / "report").exists()
