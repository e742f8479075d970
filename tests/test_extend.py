"""Training a run further than planned: `lmctl resume RUN --steps N`.

The batch of step s is a pure function of (seed, s, global batch), and the WSD rate before its decay does not
depend on train.steps, so a run stopped before its decay and extended is the run planned that long, bit for
bit. A finished (decayed) run re-warms; its batches are still those of the longer plan.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train import small_spec, train_losses

from model.config import ConfigError
from model.metrics import read_metrics
from model.optim import lr_at
from model.train import train
from orchestrator import launch as launching
from orchestrator.backends import LocalBackend
from orchestrator.cli import main

WSD = ["train.schedule=wsd", "train.decay_fraction=0.25", "train.warmup_steps=2"]


def extended(spec, steps: int):
    return spec.with_train(steps=steps)


def test_a_run_stopped_before_its_decay_and_extended_is_the_longer_run_bit_for_bit(small_data, tmp_path):
    planned_12 = small_spec(small_data, *WSD, "train.steps=12")
    train(planned_12, tmp_path / "twelve", device="cpu")

    planned_8 = small_spec(small_data, *WSD, "train.steps=8")  # its decay would start at step 6
    train(planned_8, tmp_path / "ext", device="cpu", stop_at=4)
    train(extended(planned_8, 12), tmp_path / "ext", device="cpu")
    assert train_losses(tmp_path / "ext") == train_losses(tmp_path / "twelve")


def test_a_finished_run_extended_sees_the_longer_runs_batches_at_the_new_schedules_rates(
    small_data, tmp_path, monkeypatch
):
    import model.train as train_module

    seen: dict[str, dict[int, list]] = {}

    class Recording(train_module.BatchLoader):
        def micro_batches(self, step):
            batches = super().micro_batches(step)
            seen[self._label][step] = [x.tolist() for x, _ in batches]
            return batches

    monkeypatch.setattr(train_module, "BatchLoader", Recording)
    spec8, spec4 = (
        small_spec(small_data, *WSD, "train.decay_fraction=0.5", "train.steps=8"),
        small_spec(small_data, *WSD, "train.decay_fraction=0.5", "train.steps=4"),
    )
    for label, runs in (("eight", [spec8]), ("ext", [spec4, extended(spec4, 8)])):
        seen[label] = {}
        Recording._label = label
        for spec in runs:
            train(spec, tmp_path / label, device="cpu")
    assert sorted(seen["ext"]) == sorted(seen["eight"]) == list(range(8))
    assert seen["ext"] == seen["eight"], "every step's batches are the 8-step run's"

    logged = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "ext" / "metrics.jsonl") if "lr" in r}
    t4, t8 = spec4.train, spec8.train
    assert logged[4] == pytest.approx(lr_at(3, t4))  # the 4-step run decayed to its end
    for step in range(5, 9):  # then the extension: the 8-step schedule, re-warmed at step 4
        assert logged[step] == pytest.approx(lr_at(step - 1, t8)), step
    assert logged[5] > logged[4]


def test_only_wsd_runs_extend_and_only_to_more_steps(small_data):
    wsd, cosine = small_spec(small_data, *WSD), small_spec(small_data, "train.schedule=cosine")
    with pytest.raises(ConfigError, match=r"cosine schedule.*train.schedule=wsd"):
        launching.extend_schedule(cosine, 16, 8, "r")
    with pytest.raises(ConfigError, match="give more than 8"):
        launching.extend_schedule(wsd, 8, 8, "r")
    assert launching.extend_schedule(wsd, 16, 8, "r").train.steps == 16

    note = launching.schedule_change(wsd.train, extended(wsd, 16).train, done=4)
    assert "as in a run planned for 16" in note and "step 12" in note  # 16's decay starts at 12
    decayed = launching.schedule_change(wsd.train, extended(wsd, 16).train, done=8)
    assert "re-warms" in decayed and "since step 6" in decayed


def _dry_run(runs_dir: Path, name: str, *overrides: str) -> Path:
    args = ["launch", "--config", "tiny", "--name", name, "--dry-run", "--runs-dir", str(runs_dir)]
    for o in overrides:
        args += ["--override", o]
    assert main(args) == 0
    return runs_dir / name


def test_resume_steps_refusals_are_one_line_and_change_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(LocalBackend, "start", lambda self, path: pytest.fail("nothing may start"))
    path = _dry_run(tmp_path, "cos", "train.schedule=cosine")  # tiny: 200 steps
    config, record = (path / "config.yaml").read_text(), (path / "run.json").read_text()
    for steps, expected in (("400", "cosine schedule"), ("100", "give more than 200")):
        assert main(["resume", "cos", "--steps", steps, "--runs-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit, match="2"):
        main(["resume", "cos", "--steps", "0", "--runs-dir", str(tmp_path)])
    assert "steps >= 1" in capsys.readouterr().err
    assert (path / "config.yaml").read_text() == config and (path / "run.json").read_text() == record


def test_resume_steps_rewrites_the_plan_of_a_local_run(tmp_path, capsys, monkeypatch):
    path = _dry_run(tmp_path, "w", "train.schedule=wsd")
    started = []
    monkeypatch.setattr(
        LocalBackend, "start", lambda self, p: started.append(p) or launching.runs.read_record(p)
    )
    record = launching.resume("w", root=tmp_path, steps=300, notify=print)
    assert started == [path] and record.steps == 300
    spec = launching.load_spec(path / "config.yaml")
    assert spec.train.steps == 300 and spec.train.schedule == "wsd"
    assert (path / "config.yaml").read_text() == spec.to_yaml()
    assert "as in a run planned for 300" in capsys.readouterr().out
