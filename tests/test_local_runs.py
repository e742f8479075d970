"""Local mode end to end: `lmctl launch --mode local` on a real Ray cluster with 2 CPU workers.

Each run goes through the CLI in a subprocess, exactly as a user types it. Crashes are real SIGKILLs of the
run's processes; "the same as an uninterrupted run" means the per-step losses are equal bit for bit.
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

import pytest
from test_train import unigram_cross_entropy

from model.metrics import read_metrics
from orchestrator import runs

pytestmark = pytest.mark.slow

# 80 steps, a loss logged every step, checkpoints every 20: short, yet long enough to kill in the middle.
SHORT = [
    "--override",
    "train.steps=80",
    "--override",
    "train.log_every=1",
    "--override",
    "train.eval_every=40",
]
SHORT += ["--override", "train.checkpoint_every=20"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Environment of the module's runs: their own runs folder, store and cache; wandb offline."""
    base = tmp_path_factory.mktemp("lab")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCTL_", "WANDB_"))}
    env.update(LMCTL_RUNS_DIR=str(base / "runs"), LMCTL_CACHE=str(base / "cache"), WANDB_MODE="offline")
    yield env
    for path in runs.list_runs(base / "runs"):  # a failed test must not leave its detached run training
        session = runs.read_record(path).session
        if session:
            runs.kill_session(session)


def lmctl(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_path(env: dict[str, str], name: str) -> Path:
    return Path(env["LMCTL_RUNS_DIR"]) / name


def status(env: dict[str, str], name: str) -> dict:
    out = lmctl(env, "status", name, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def losses(env: dict[str, str], name: str) -> list[tuple[int, float]]:
    return [
        (r["step"], r["loss"]) for r in read_metrics(run_path(env, name) / "metrics.jsonl") if "loss" in r
    ]


def wait_for_step(env: dict[str, str], name: str, step: int, timeout: float = 180) -> None:
    """Until the run has logged `step` (polls its metrics file; fails on timeout or if the run ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = losses(env, name)
        if done and done[-1][0] >= step:
            return
        if (run_path(env, name) / runs.RUN_RECORD).exists():  # a --foreground launch may still be rendering
            record = runs.read_record(run_path(env, name))
            ended = f"run ended before step {step}: {record.message}"
            assert runs.effective_state(record) in ("created", *runs.ACTIVE), ended
        time.sleep(0.1)
    raise AssertionError(f"run {name} did not reach step {step} in {timeout} s")


def assert_nothing_left(env: dict[str, str], name: str) -> None:
    record = runs.read_record(run_path(env, name))
    assert record.session and runs.session_pids(record.session) == []


@pytest.fixture(scope="module")
def reference(lab) -> list[tuple[int, float]]:
    """An uninterrupted 80-step run in the foreground: the losses every other run must reproduce."""
    out = lmctl(
        lab, "launch", "--mode", "local", "--config", "tiny", "--name", "reference", "--foreground", *SHORT
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
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
    assert {"config.yaml", "task.yaml", "run.json", "metrics.jsonl", "logs"} <= {
        p.name for p in path.iterdir()
    }

    table = lmctl(lab, "status")
    assert table.returncode == 0 and "smoke" in table.stdout and "200/200" in table.stdout
    log = lmctl(lab, "logs", "smoke", "-f", timeout=30)
    assert log.returncode == 0 and "finished at step 200" in log.stdout
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


def test_sigkill_of_the_whole_run_then_resume_matches_an_uninterrupted_run(lab, reference):
    kill_at = random.Random(4).randrange(25, 70)
    assert lmctl(lab, "launch", "--config", "tiny", "--name", "killed", *SHORT).returncode == 0
    wait_for_step(lab, "killed", kill_at)
    record = runs.read_record(run_path(lab, "killed"))
    assert runs.kill_session(record.session, signal.SIGKILL)  # driver, Ray and workers at once
    killed_after = losses(lab, "killed")[-1][0]
    s = status(lab, "killed")
    assert s["state"] == "failed"  # the record still says running; status tells the truth

    out = lmctl(lab, "resume", "killed")
    assert out.returncode == 0, out.stderr
    done = lmctl(lab, "logs", "killed", "-f", timeout=240)
    assert "resumed from checkpoint at step" in done.stdout
    resumed_at = int(done.stdout.split("resumed from checkpoint at step ")[1].split()[0])
    assert resumed_at % 20 == 0 and killed_after - 40 < resumed_at <= killed_after  # one interval, or two
    # when the kill landed while the newest checkpoint was being written
    s = status(lab, "killed")
    assert (s["state"], s["step"], s["launches"]) == ("finished", 80, 2)
    assert losses(lab, "killed") == reference  # bit for bit
    assert_nothing_left(lab, "killed")


def test_a_killed_worker_is_restarted_by_ray_and_the_run_finishes(lab, reference):
    assert lmctl(lab, "launch", "--config", "tiny", "--name", "worker-crash", *SHORT).returncode == 0
    wait_for_step(lab, "worker-crash", 30)
    pid = int((run_path(lab, "worker-crash") / "logs" / "worker-1.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    done = lmctl(lab, "logs", "worker-crash", "-f", timeout=240)
    assert "resumed from checkpoint at step" in done.stdout
    s = status(lab, "worker-crash")
    assert (s["state"], s["step"], s["launches"]) == ("finished", 80, 1)  # nobody typed anything
    assert losses(lab, "worker-crash") == reference
    assert_nothing_left(lab, "worker-crash")


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


def test_a_local_run_can_use_an_s3_store(lab, s3_bucket):
    """--store s3://...: staged data and checkpoints land in the bucket (a real S3 server on loopback)."""
    from model.store import open_store

    env = {**lab, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    env["AWS_ENDPOINT_URL"] = s3_bucket.endpoint
    args = [
        "--override",
        "train.steps=20",
        "--override",
        "train.checkpoint_every=10",
        "--store",
        s3_bucket.uri,
    ]
    out = lmctl(env, "launch", "--config", "tiny", "--name", "in-s3", "--foreground", *args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    s = status(env, "in-s3")
    assert (s["state"], s["last_checkpoint"]) == ("finished", 20)
    assert s["checkpoints"] == f"{s3_bucket.uri}/runs/in-s3/checkpoints" and s["data"].startswith(
        s3_bucket.uri
    )
    keys = open_store(s3_bucket.uri, s3_bucket.endpoint).list("")
    assert "runs/in-s3/checkpoints/step_000000020/COMMIT" in keys
    assert any(k.startswith("datasets/") and k.endswith("manifest.json") for k in keys)
    assert_nothing_left(env, "in-s3")


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
