"""The run backends seam: one backend chosen from the run record, verbs that never branch on the mode, and
one stop protocol (runs.StopRequest in the run's store) for local and cloud runs alike.

Local runs are rendered for real (`lmctl launch --dry-run`) into a file:// store; their "driver" is a real
process. The SkyPilot side is driven through its SDK boundary in test_cloud_sdk.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import test_cli
import test_observe
from test_observe import driver_of

from model.errors import ConfigError
from orchestrator import backends, launch, runs
from orchestrator.cli import main

REPO = Path(__file__).resolve().parent.parent
runs_dir, spawn = test_cli.runs_dir, test_observe.spawn  # their fixtures: a runs folder, real processes
VERBS = ("cli.py", "launch.py", "observe.py", "remove.py", "driver.py", "worker.py", "runs.py")


def test_the_backend_comes_from_the_record():
    record = runs.RunRecord("r", "local", "created", "tiny", 0.0, 0.0, "file:///s", "file:///s/c")
    assert isinstance(backends.of(record), backends.LocalBackend)
    record.mode = "cloud"
    assert isinstance(backends.of(record), backends.SkyPilotBackend)
    with pytest.raises(ConfigError, match="--mode 'pod': use one of local, cloud"):
        backends.for_mode("pod")


@pytest.mark.parametrize("module", VERBS)
def test_no_verb_branches_on_the_mode(module):
    """`x.mode == ...`, `mode != ...` or `if record.managed` outside backends.py and cloud.py would put the
    local/cloud decision back into a verb: the backend answers instead."""
    tree = ast.parse((REPO / "orchestrator" / module).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            names = [n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "") for n in ast.walk(node)]
            if "mode" in names:
                found.append(node.lineno)
        if isinstance(node, (ast.If, ast.IfExp)):
            for n in ast.walk(node.test):
                if (
                    isinstance(n, ast.Attribute)
                    and n.attr == "managed"
                    and getattr(n.value, "id", "") == "record"
                ):
                    found.append(n.lineno)
    assert not found, f"orchestrator/{module} decides on the mode at lines {found}"


def test_a_stop_request_is_an_object_in_the_store(tmp_path, monkeypatch):
    monkeypatch.delenv("LMCTL_STORE_POLL_S", raising=False)
    store = f"file://{tmp_path / 'store'}"
    asker, worker = runs.StopRequest(store, "r"), runs.StopRequest(store, "r")
    assert worker.every_s == 0 and not worker.asked()  # a file:// store is looked at every step
    asker.ask()
    assert (tmp_path / "store" / "runs" / "r" / "STOP").is_file() and worker.asked()
    asker.clear()
    assert not (tmp_path / "store" / "runs" / "r" / "STOP").exists()
    asker.clear()  # clearing twice is fine: a start clears whatever is there


def test_a_remote_store_is_polled_at_most_every_stop_poll_s(tmp_path, monkeypatch):
    """A remote store costs a network call per poll; seen through a file:// store with the s3 interval."""
    monkeypatch.setenv("LMCTL_STORE_POLL_S", "3600")
    store = f"file://{tmp_path / 'store'}"
    worker = runs.StopRequest(store, "r")
    assert worker.every_s == 3600 and not worker.asked()
    runs.StopRequest(store, "r").ask()
    assert not worker.asked()  # polled a moment ago: the next look is due in an hour
    worker._polled = float("-inf")  # the hour has passed
    assert worker.asked()


def test_lmctl_stop_of_a_local_run_asks_through_its_store(runs_dir, spawn, capsys):
    """The run's driver (here a process that ignores the request) is asked through the store, as a cloud
    run's pods are; past the timeout its backend kills it and the run is stopped."""
    store = f"file://{runs_dir.parent / 'store'}"
    assert main(["launch", "--config", "tiny", "--name", "deaf", "--dry-run", "--store", store]) == 0
    path = runs_dir / "deaf"
    deaf = spawn(sys.executable, "-c", "import time; time.sleep(600)")
    runs.update_record(path, state="running", driver=driver_of(deaf), session=deaf.pid)
    record = launch.stop("deaf", timeout=0.3)
    assert (runs_dir.parent / "store" / "runs" / "deaf" / "STOP").read_bytes() == b"stop\n"
    assert record.state == "stopped" and "not stopped after 0 s, killed" in record.message
    assert deaf.wait(timeout=10) != 0 and not runs.driver_alive(record)


def test_starting_a_local_run_answers_an_earlier_stop(runs_dir, monkeypatch):
    """resume after a stop: the STOP left in the store must not stop the new driver at its first step."""
    store = f"file://{runs_dir.parent / 'store'}"
    assert main(["launch", "--config", "tiny", "--name", "again", "--dry-run", "--store", store]) == 0
    path = runs_dir / "again"
    runs.StopRequest(store, "again").ask()
    started, popen = [], subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a) or popen(["true"]))
    record = backends.LocalBackend().start(path)
    assert started and record.launches == 1 and record.state == "staging"
    assert not runs.StopRequest(store, "again").asked()


def test_rank_0_on_a_node_without_the_history_pulls_it_from_the_store(tmp_path):
    """Nodes share no disk and rank 0 may land on any of them (after a recovery, on a new one): it takes the
    run's metrics.jsonl from the store, so the loop cuts it back and appends instead of starting a fresh
    file that its next push would write over the history."""
    from orchestrator.worker import StoreMirror

    store, head, other = f"file://{tmp_path}/store", tmp_path / "head", tmp_path / "other"
    head.mkdir(), other.mkdir()
    (head / runs.METRICS).write_text('{"step": 5}\n{"step": 10}\n')
    StoreMirror(store, "r", head / runs.METRICS).push_metrics(now=True)
    mirror = StoreMirror(store, "r", other / runs.METRICS)
    mirror.pull()
    assert (other / runs.METRICS).read_text() == '{"step": 5}\n{"step": 10}\n'
    (other / runs.METRICS).write_text('{"step": 5}\n{"step": 10}\n{"step": 15}\n')  # this node's, newer
    mirror.pull()
    assert (other / runs.METRICS).read_text().count("\n") == 3
    StoreMirror(store, "new", tmp_path / "fresh.jsonl").pull()  # nothing in the store yet: nothing to pull
    assert not (tmp_path / "fresh.jsonl").exists()
