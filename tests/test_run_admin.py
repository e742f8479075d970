"""Run administration: loadable checkpoints (pruning that leaves nothing behind, `lmctl checkpoints`, status),
`lmctl rm`, dry runs marked in status, and `lmctl stop` reaping what a dead driver left behind.

Runs are rendered for real (`lmctl launch --dry-run`), checkpoints are written by the real Checkpointer,
stores are file:// folders or the loopback S3 server, and drivers and leftovers are real processes.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import test_cli
import test_observe
import torch
from test_cli import one_line_error
from test_observe import driver_of, render

from model.checkpoint import COMMIT, Checkpointer, CheckpointError
from model.store import open_store
from orchestrator import observe, runs
from orchestrator.cli import main

REPO = Path(__file__).resolve().parent.parent
runs_dir, spawn = test_cli.runs_dir, test_observe.spawn  # their fixtures: a runs folder, real processes


def state(step: int) -> dict:
    return {"model": {"w": torch.full((1000,), float(step))}}


@pytest.fixture
def store(request, tmp_path, monkeypatch) -> str:
    """A run store: a file:// folder, or a fresh bucket on loopback S3 (its endpoint in the environment, as
    a user of R2 or MinIO sets it)."""
    monkeypatch.setenv("LMCTL_CACHE", str(tmp_path / "cache"))
    if getattr(request, "param", "file") == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", bucket.endpoint)
        return bucket.uri
    return f"file://{tmp_path / 'store'}"


def dry_run(name: str, store: str) -> runs.RunRecord:
    assert main(["launch", "--config", "tiny", "--name", name, "--dry-run", "--store", store]) == 0
    return runs.read_record(runs.find_run(runs.runs_root(), name))


def save_steps(record: runs.RunRecord, steps, keep: int = 2) -> Checkpointer:
    c = Checkpointer(record.checkpoints, keep=keep)
    for step in steps:
        c.save(step, state(step), {})
    return c


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def file_bytes(root: str, step: int) -> int:
    """What a step's files (COMMIT aside) hold, as the store lists them: the size a listing must show."""
    sizes = open_store(root).list_sizes(f"step_{step:09d}")
    return sum(n for key, n in sizes.items() if not key.endswith(COMMIT))


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("where", ["folder", "file", "s3"])
def test_pruning_removes_pruned_step_folders_entirely(request, tmp_path, where):
    root = {"folder": tmp_path / "ckpt", "file": f"file://{tmp_path / 'store'}/runs/r/checkpoints"}.get(where)
    endpoint = None
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        root, endpoint = f"{bucket.uri}/runs/r/checkpoints", bucket.endpoint
    c = Checkpointer(root, keep=2, endpoint_url=endpoint, cache_dir=tmp_path / "cache")
    for step in (1, 2, 3, 4):
        c.save(step, state(step), {})

    kept = [f"step_{s:09d}/{n}" for s in (3, 4) for n in (COMMIT, "meta.json", "model.pt")]
    if where == "s3":
        assert open_store(root, endpoint).list() == kept
    else:  # no empty step_* folders left behind (a file:// store used to keep them)
        folder = Path(str(root).removeprefix("file://"))
        assert tree(folder) == sorted(kept + ["step_000000003", "step_000000004"])
    assert [s.step for s in c.committed()] == [3, 4]
    assert all(s.size > 4000 and s.time is not None for s in c.committed())  # 1000 floats and a meta.json
    with pytest.raises(CheckpointError, match="no valid COMMIT"):
        c.load(step=2)


def test_a_crash_in_the_middle_of_pruning_leaves_nothing_loadable_and_the_next_prune_cleans_it(tmp_path):
    """Pruning removes COMMIT first: a prune killed after that (rebuilt here as the files it would leave) left
    a folder that is never listed or loaded, and the next save's prune removes it; the newest is untouched."""
    c = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        c.save(step, state(step), {})
    assert c.committed_steps() == [2, 3]
    torn = c.step_dir(2)
    (torn / COMMIT).unlink()  # the prune of step 2 got this far ...
    (torn / "meta.json").unlink()  # ... and one file further

    assert c.committed_steps() == [3] and [s.step for s in c.committed()] == [3]
    assert c.load()[1]["step"] == 3
    with pytest.raises(CheckpointError):
        c.load(step=2)
    c.save(4, state(4), {})
    assert c.committed_steps() == [3, 4] and not torn.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000003", "step_000000004"]


# ---------------------------------------------------------------- listing: lmctl checkpoints, status


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
def test_checkpoints_verb_and_status_list_committed_checkpoints(runs_dir, store, capsys):
    record = dry_run("ck", store)
    save_steps(record, (10, 20, 30))
    open_store(record.checkpoints).put_bytes("step_000000040/model.pt", b"half")  # a crashed save
    capsys.readouterr()

    assert main(["checkpoints", "ck", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["step"], c["size"]) for c in listed] == [
        (s, file_bytes(record.checkpoints, s)) for s in (20, 30)
    ]
    assert all(isinstance(c["time"], float) for c in listed)
    assert listed[-1]["location"] == f"{record.checkpoints}/step_000000030"

    assert main(["checkpoints", "ck"]) == 0
    table = capsys.readouterr().out
    assert "20" in table and "5.6KB" in table and "step_000000040" not in table

    assert main(["status", "ck", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["committed_checkpoints"] == listed and summary["checkpoints"] == record.checkpoints
    assert main(["status", "ck"]) == 0
    assert "loadable steps" in capsys.readouterr().out

    assert main(["status", "--json"]) == 0  # every run's status reads no store
    assert "committed_checkpoints" not in json.loads(capsys.readouterr().out)[0]


def test_checkpoints_of_a_run_without_any(runs_dir, store, capsys):
    dry_run("empty", store)
    assert main(["checkpoints", "empty"]) == 0
    assert "no committed checkpoint yet" in capsys.readouterr().out
    assert main(["checkpoints", "empty", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_an_unreadable_store_is_one_line_for_checkpoints_and_a_warning_for_status(
    runs_dir, s3_bucket, monkeypatch, capsys
):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_bucket.endpoint)
    dry_run("gone", "s3://no-such-bucket-here/lm")
    capsys.readouterr()
    assert main(["checkpoints", "gone"]) == 2
    one_line_error(capsys, "bucket 'no-such-bucket-here' does not exist")
    assert main(["status", "gone", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["committed_checkpoints"] is None and "checkpoints not listed" in out.err


@pytest.mark.parametrize("verb", [["checkpoints", "x"], ["status", "x"], ["rm", "x", "--yes"]])
def test_listing_and_removing_import_no_torch(runs_dir, store, verb):
    record = dry_run("x", store)
    save_steps(record, (1,))
    code = f"import sys; from orchestrator.cli import main; main({verb!r}); print('torch' in sys.modules)"
    env = {**os.environ, "LMCTL_RUNS_DIR": str(runs_dir)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.stdout.split()[-1] == "False", out.stderr


# ---------------------------------------------------------------- lmctl rm


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
def test_rm_removes_the_run_folder_and_its_store_prefix_only(runs_dir, store, capsys):
    record = dry_run("x", store)
    dry_run("x2", store)  # a name that starts like it: its objects must stay
    save_steps(record, (1, 2))
    bucket = open_store(store)
    for key in ("runs/x/metrics.jsonl", "runs/x/STOP", "runs/x2/metrics.jsonl", "datasets/abc/manifest.json"):
        bucket.put_bytes(key, b"{}\n")
    ours = bucket.list_sizes("runs/x")
    capsys.readouterr()

    assert main(["rm", "x", "--yes", "--json"]) == 0
    out = capsys.readouterr()
    shown = json.loads(out.out)
    assert shown == {
        "run": "x",
        "folder": str(runs_dir / "x"),
        "store_prefix": f"{store}/runs/x",
        "store_objects": len(ours),
        "store_bytes": sum(ours.values()),
        "removed": True,
    }
    assert len(ours) == 8 and f"{len(ours)} objects" in out.err and "remove?" not in out.err
    assert not (runs_dir / "x").exists() and (runs_dir / "x2" / "run.json").is_file()
    assert bucket.list() == ["datasets/abc/manifest.json", "runs/x2/metrics.jsonl"]
    if store.startswith("file://"):  # no empty folders left in the store either
        assert not (Path(store.removeprefix("file://")) / "runs" / "x").exists()


def test_rm_without_a_terminal_needs_yes_and_removes_nothing(runs_dir, store, capsys):
    record = dry_run("keep", store)
    save_steps(record, (1,))
    capsys.readouterr()
    assert main(["rm", "keep"]) == 2
    out = capsys.readouterr()
    assert "the run folder" in out.out and "3 objects" in out.out  # what would go is said first
    err = out.err.strip()
    assert "add --yes" in err and "\n" not in err and "Traceback" not in err
    assert (runs_dir / "keep" / "run.json").is_file() and len(open_store(store).list()) == 3


def rm_on_a_terminal(runs_dir: Path, name: str, answer: str) -> subprocess.CompletedProcess:
    """`lmctl rm` with a real terminal as stdin (a pty), answering the question with `answer`."""
    main_fd, term_fd = pty.openpty()
    os.write(main_fd, answer.encode())
    env = {**os.environ, "LMCTL_RUNS_DIR": str(runs_dir)}
    cmd = [sys.executable, "-m", "orchestrator.cli", "rm", name]
    try:
        return subprocess.run(
            cmd, stdin=term_fd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60
        )
    finally:
        os.close(main_fd)
        os.close(term_fd)


def test_rm_asks_on_a_terminal(runs_dir, store):
    dry_run("asked", store)
    no = rm_on_a_terminal(runs_dir, "asked", "n\n")
    assert no.returncode == 2 and "remove? [y/N]" in no.stderr and "nothing removed" in no.stderr
    assert (runs_dir / "asked").is_dir()
    yes = rm_on_a_terminal(runs_dir, "asked", "y\n")
    assert yes.returncode == 0, yes.stderr
    assert "removed run asked" in yes.stdout and not (runs_dir / "asked").exists()


def test_rm_refuses_a_running_run(runs_dir, store, spawn, capsys):
    dry_run("busy", store)
    driver = spawn("sleep", "600")
    runs.update_record(runs_dir / "busy", state="running", driver=driver_of(driver), launches=1)
    capsys.readouterr()
    assert main(["rm", "busy", "--yes"]) == 2
    one_line_error(capsys, "run 'busy' is running: stop it first (lmctl stop busy)")
    assert (runs_dir / "busy" / "run.json").is_file()


# ---------------------------------------------------------------- dry runs in status


def test_status_marks_dry_runs_never_started(runs_dir, store, capsys):
    dry_run("plan", store)
    dry_run("went", store)
    runs.update_record(runs_dir / "went", state="stopped", launches=1)  # started once since
    dry_run("staging", store)
    runs.update_record(runs_dir / "staging", dry_run=False)  # a launch still staging: not a dry run
    capsys.readouterr()

    assert main(["status", "--json"]) == 0
    shown = {s["name"]: (s["state"], s["dry_run"]) for s in json.loads(capsys.readouterr().out)}
    assert shown == {"plan": ("created", True), "went": ("stopped", False), "staging": ("created", False)}
    table = render(observe.status_table([observe.run_summary(runs_dir / n) for n in shown]))
    rows = {line.split()[0]: line.split()[2] for line in table.splitlines()[1:]}
    assert rows == {"plan": "dry-run", "went": "stopped", "staging": "created"}
    detail = render(observe.status_detail(observe.run_summary(runs_dir / "plan")))
    assert "dry-run" in detail and "lmctl resume plan starts it" in detail
    assert main(["stop", "plan"]) == 0
    assert "is a dry run, never started: `lmctl resume plan` starts it" in capsys.readouterr().out


# ---------------------------------------------------------------- stop reaps a dead driver's leftovers


def test_stop_reaps_what_a_dead_driver_left_behind(runs_dir, store, spawn, capsys):
    """The record still says running, its driver is gone, and a process of its session still runs (Ray's
    agents outlive a killed driver): stop kills the leftover and records the run as failed, as resume does,
    and rm, refused while the leftover ran, then goes ahead."""
    dry_run("dead", store)
    driver = spawn("sleep", "600")
    dead = driver_of(driver)
    driver.kill()
    driver.wait()
    leftover = spawn(sys.executable, "-c", "import time; time.sleep(600)")  # a session of its own
    path = runs_dir / "dead"
    runs.update_record(path, state="running", driver=dead, session=leftover.pid, launches=1)
    capsys.readouterr()

    assert main(["rm", "dead", "--yes"]) == 2
    one_line_error(capsys, "lmctl stop dead reaps them")

    assert main(["stop", "dead"]) == 0
    assert "1 leftover process(es) killed" in capsys.readouterr().out
    assert leftover.wait(timeout=60) == -signal.SIGKILL
    record = runs.read_record(path)
    assert (record.state, runs.session_pids(leftover.pid)) == ("failed", [])
    assert "its driver died" in record.message

    assert main(["stop", "dead"]) == 0  # nothing left: said plainly, nothing changed
    assert "is not running (failed)" in capsys.readouterr().out
    assert main(["rm", "dead", "--yes"]) == 0 and not path.exists()


def test_reap_records_the_state_only_of_a_run_that_still_claims_to_run(runs_dir, store, spawn):
    dry_run("r", store)
    path = runs_dir / "r"
    leftover = spawn("sleep", "600")
    runs.update_record(path, state="stopped", session=leftover.pid, message="stopped by lmctl stop")
    assert runs.reap(path, runs.read_record(path)) == [leftover.pid]
    assert leftover.wait(timeout=60) == -signal.SIGKILL
    assert runs.read_record(path).state == "stopped"  # a state it said itself is kept
