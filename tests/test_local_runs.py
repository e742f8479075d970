"""Local mode end to end: `lmctl launch --mode local` on a real Ray cluster with 2 CPU workers.

Each run goes through the CLI in a subprocess, exactly as a user types it. Crashes are real SIGKILLs of the
run's processes (tests/chaos.py); "the same as an uninterrupted run" means the per-step losses are equal
bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import chaos
import pytest
from chaos import SHORT, lmctl, losses, run_path, status, wait_for_step
from test_train import unigram_cross_entropy

from model.metrics import read_metrics
from orchestrator import runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Environment of the module's runs: their own runs folder, store and cache; wandb offline."""
    env = chaos.lab_env(tmp_path_factory.mktemp("lab"))
    yield env
    for path in runs.list_runs(Path(env["LMCTL_RUNS_DIR"])):  # a failed test must not leave a run training
        session = runs.read_record(path).session
        if session:
            runs.kill_session(session)


def assert_nothing_left(env: dict[str, str], name: str) -> None:
    assert chaos.nothing_left(env, name)


@pytest.fixture(scope="module")
def reference(lab) -> list[tuple[int, float]]:
    """An uninterrupted 80-step run in the foreground: the losses every other run must reproduce. Its
    twin is launched at the same instant, into the same runs folder and the same cold store (both stage
    the same dataset at once); test_two_runs_at_once_do_not_interfere checks on it."""
    store = ["--store", f"file://{Path(lab['LMCTL_RUNS_DIR']).parent / 'pair-store'}"]
    args = ["launch", "--mode", "local", "--config", "tiny", *SHORT, *store]
    cmd = [sys.executable, "-m", "orchestrator.cli", *args, "--name", "reference", "--foreground"]
    fg = subprocess.Popen(cmd, env=lab, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    twin = lmctl(lab, *args, "--name", "twin")
    out, _ = fg.communicate(timeout=600)
    assert twin.returncode == 0, twin.stderr
    assert fg.returncode == 0, out[-3000:]
    ref = losses(lab, "reference")
    assert [s for s, _ in ref] == list(range(1, 81))
    return ref


def test_smoke_run_stages_trains_evaluates_checkpoints_and_learns(lab, tmp_path):
    """The README's smoke command (tiny preset, 200 steps), then every verb that reads a finished run."""
    out = lmctl(lab, "launch", "--mode", "local", "--config", "tiny", "--name", "smoke", "--foreground")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    assert "staged" in out.stdout and "finished at step 200" in out.stdout

    s = status(lab, "smoke")
    assert (s["state"], s["step"], s["last_checkpoint"]) == ("finished", 200, 200)
    train = losses(lab, "smoke")
    assert train[0][1] - train[-1][1] > 1.5  # from ~7.6 (log 2048) to ~4.8
    vals = [r["val_loss"] for r in read_metrics(run_path(lab, "smoke") / "metrics.jsonl") if "val_loss" in r]
    assert len(vals) == 4 and vals == sorted(vals, reverse=True)  # falls at every evaluation
    baseline = unigram_cross_entropy(Path(s["data"].removeprefix("file://")))
    assert vals[-1] < baseline - 1.0, (vals, baseline)  # far better than counting tokens
    assert_nothing_left(lab, "smoke")
    path = run_path(lab, "smoke")
    ckpts = Path(s["checkpoints"].removeprefix("file://"))
    for p in [path, *path.rglob("*"), ckpts, *ckpts.rglob("*")]:  # run state is the owner's alone
        assert p.stat().st_mode & 0o077 == 0, f"{p} is {oct(p.stat().st_mode)}"
    assert {"config.yaml", "task.yaml", "run.json", "metrics.jsonl", "logs"} <= {
        p.name for p in path.iterdir()
    }

    table = lmctl(lab, "status")
    assert table.returncode == 0 and "smoke" in table.stdout and "200/200" in table.stdout
    log = lmctl(lab, "logs", "smoke", "-f", timeout=30)
    assert log.returncode == 0 and "finished at step 200" in log.stdout
    assert "val_loss" in log.stdout and "Reporting training result" not in log.stdout  # Ray's line per report
    attach = lmctl(lab, "attach", "smoke", timeout=30)
    assert attach.returncode == 0 and "finished" in attach.stdout and "200/200" in attach.stdout

    plot = lmctl(lab, "plot", "smoke", "--out", str(tmp_path / "loss.png"))
    assert plot.returncode == 0 and (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gen = lmctl(lab, "generate", "smoke", "--prompt", "ROMEO:", "--max-tokens", "20", "--json")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["step"] == 200 and json.loads(gen.stdout)["text"].strip()
    exp = lmctl(lab, "export", "smoke", "--hf", str(tmp_path / "hf"))
    assert exp.returncode == 0, exp.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()
    }

    again = lmctl(lab, "resume", "smoke")
    assert again.returncode == 2 and "nothing to resume" in again.stderr and "Traceback" not in again.stderr


def test_a_finished_local_run_is_trained_further_with_resume_steps(lab):
    """20 steps of a WSD run, finished; `resume --steps 30` continues it from its step-20 checkpoint."""
    args = ["--override", "train.schedule=wsd", "--override", "train.steps=20"]
    args += ["--override", "train.log_every=1"]
    out = lmctl(lab, "launch", "--config", "tiny", "--name", "longer", *args, "--foreground")
    assert out.returncode == 0 and "finished at step 20" in out.stdout, out.stdout[-2000:] + out.stderr
    more = lmctl(lab, "resume", "longer", "--steps", "30", "--foreground")
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr
    assert "extending from 20 to 30 steps" in more.stderr and "re-warms" in more.stderr
    assert "resumed from checkpoint at step 20" in more.stdout and "finished at step 30" in more.stdout
    s = status(lab, "longer")
    assert (s["state"], s["step"], s["steps"], s["last_checkpoint"]) == ("finished", 30, 30, 30)
    assert [step for step, _ in losses(lab, "longer")] == list(range(1, 31))
    assert_nothing_left(lab, "longer")


def test_two_runs_at_once_do_not_interfere(lab, reference):
    """The reference's twin shared its runs folder and cold store and started at the same instant: one of
    the two staged the dataset while the other waited for it, and the twin's losses are the reference's."""
    done = lmctl(lab, "logs", "twin", "-f", timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    s = status(lab, "twin")
    assert (s["state"], s["step"], s["launches"]) == ("finished", 80, 1)
    assert losses(lab, "twin") == reference
    logs = [chaos.log_text(lab, name) for name in ("reference", "twin")]
    assert sorted("] staged " in log for log in logs) == [False, True]  # one staged, the other reused it
    assert s["data"] == status(lab, "reference")["data"]  # one staged copy
    store = Path(s["data"].removeprefix("file://")).parent
    assert [p.name for p in store.iterdir()] == [Path(s["data"]).name]
    ckpts = {name: status(lab, name)["checkpoints"] for name in ("reference", "twin")}
    assert ckpts["twin"] != ckpts["reference"] and all(
        c.endswith(f"runs/{n}/checkpoints") for n, c in ckpts.items()
    )
    assert_nothing_left(lab, "twin")


def test_kills_at_random_instants_lose_nothing(lab, reference, tmp_path):
    """One run killed five ways at seeded instants (tests/chaos.py): inside staging, inside a checkpoint
    write, the whole session mid-training, the driver alone, one Ray worker. After each it resumes (the
    worker: Ray restarts it) from a committed checkpoint, redoing fewer than two checkpoint intervals, and
    its per-step losses equal the uninterrupted run's bit for bit."""
    plan = chaos.plan_kills(random.Random(6), ["staging", "checkpoint", "session", "driver", "worker"])
    run = chaos.chaos_run(lab, "chaos", plan, reference, extra=["--store", f"file://{tmp_path / 'cold'}"])
    report = json.dumps(run.to_dict(), indent=1)
    assert run.finished and run.identical and not run.leftovers and run.torn_loaded == 0, report
    assert run.launches == 5, report  # the launch and four resumes; the worker kill needed none
    for kill in run.kills:
        assert kill.redone <= 2 * chaos.CHECKPOINT_EVERY, report
        if kill.kind != "worker":
            assert kill.status_after == "failed", report  # the record said running: status tells the truth
            assert kill.resumed_at == max(kill.committed, default=0), report  # the newest committed one
    staging, in_write = run.kills[0], run.kills[1]
    assert staging.committed == [] and staging.resumed_at == 0 and staging.last_logged == 0, report
    assert in_write.half_written and max(in_write.half_written) > in_write.resumed_at, report  # torn, unused


def test_stop_checkpoints_and_leaves_nothing_running(lab):
    args = ["--override", "train.steps=5000", "--override", "train.log_every=5", "--wandb"]
    assert lmctl(lab, "launch", "--config", "tiny", "--name", "stopped", *args).returncode == 0
    wait_for_step(lab, "stopped", 10)
    out = lmctl(lab, "stop", "stopped")
    assert out.returncode == 0, out.stderr
    s = status(lab, "stopped")
    assert s["state"] == "stopped" and s["last_checkpoint"] == s["step"] >= 10
    assert_nothing_left(lab, "stopped")
    assert list((run_path(lab, "stopped") / "wandb").glob("offline-run-*")), "wandb logged offline"
    again = lmctl(lab, "stop", "stopped")
    assert again.returncode == 0 and "not running" in again.stdout


def test_a_stop_is_acted_on_within_a_step_whatever_log_every(lab):
    """Steps of seconds and log_every=50: the request is seen at the end of the step it came in, checkpointed
    there, and the run ends by itself (no waiting for a logging step, nobody killed at a timeout)."""
    big = [
        "train.steps=1000",
        "train.log_every=50",
        "train.global_batch_tokens=65536",
        "train.eval_every=1000",
    ]
    args = [a for o in big for a in ("--override", o)]
    assert lmctl(lab, "launch", "--config", "tiny", "--name", "slow-steps", *args).returncode == 0
    chaos.wait_for_text(lab, "slow-steps", "first step done")
    asked = time.time()
    out = lmctl(lab, "stop", "slow-steps")
    assert out.returncode == 0, out.stderr
    [stop] = [r for r in read_metrics(run_path(lab, "slow-steps") / "metrics.jsonl") if "stop" in r]
    assert stop["step"] < 50 and not losses(lab, "slow-steps")  # stopped between logging steps
    assert (stop["time"] - asked) / stop["step_s"] <= 2, stop  # seen within two steps of the request
    s = status(lab, "slow-steps")
    assert s["state"] == "stopped" and s["last_checkpoint"] == s["step"] == stop["step"], s
    assert "killed" not in (runs.read_record(run_path(lab, "slow-steps")).message or "")
    assert_nothing_left(lab, "slow-steps")


def test_ctrl_c_in_the_foreground_and_sigterm_to_the_driver_both_stop_with_a_checkpoint(lab, tmp_path):
    """Ctrl-C on `launch --foreground` stops the run cleanly (exit 130); so does SIGTERM to a resumed run's
    driver, which is what a cloud scheduler's cancel sends."""
    args = ["--override", "train.steps=5000", "--override", "train.log_every=5"]
    cmd = [sys.executable, "-m", "orchestrator.cli", "launch", "--config", "tiny", "--name", "interrupted"]
    with open(tmp_path / "out.txt", "w") as out:
        fg = subprocess.Popen([*cmd, "--foreground", *args], env=lab, stdout=out, stderr=subprocess.STDOUT)
        wait_for_step(lab, "interrupted", 10)
        fg.send_signal(signal.SIGINT)
        assert fg.wait(timeout=120) == 130
    assert "lmctl resume interrupted continues it" in (tmp_path / "out.txt").read_text()
    s = status(lab, "interrupted")
    assert s["state"] == "stopped" and s["last_checkpoint"] == s["step"] >= 10
    assert_nothing_left(lab, "interrupted")

    first_stop = s["step"]
    assert lmctl(lab, "resume", "interrupted").returncode == 0
    wait_for_step(lab, "interrupted", first_stop + 10)
    record = runs.read_record(run_path(lab, "interrupted"))
    os.kill(record.driver["pid"], signal.SIGTERM)
    lmctl(lab, "logs", "interrupted", "-f", timeout=120)  # returns once the driver has exited
    s = status(lab, "interrupted")
    assert s["state"] == "stopped" and s["last_checkpoint"] == s["step"] >= first_stop + 10
    assert s["launches"] == 2
    assert_nothing_left(lab, "interrupted")
