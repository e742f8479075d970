"""The kill report's bookkeeping (tests/chaos.py, printed by bench/chaos.py): a kill that never landed is
`missed`, never `survived`. Fake outcomes and fake run folders only: nothing is trained or launched here."""

import subprocess
import sys
from dataclasses import asdict

import chaos
import pytest
from chaos import ChaosRun, Kill, outcome, summarize

from orchestrator import runs


def chaos_run(kills: list[Kill], **broken) -> ChaosRun:
    """A run that kept every promise, unless `broken` says otherwise (identical=False, leftovers=True...)."""
    kept = {"finished": True, "identical": True, "torn_loaded": 0, "leftovers": False}
    return ChaosRun(
        name="r", kills=kills, state="finished", launches=len(kills) + 1, first_difference=None, seconds=1.0,
        **{**kept, **broken},
    )  # fmt: skip


def landed(kind: str, last_logged: int, resumed_at: int) -> Kill:
    return Kill(kind, "after step", last_logged=last_logged, resumed_at=resumed_at)


def test_a_kill_that_did_not_land_is_missed_not_survived():
    late = Kill("time", "29.00 s after the start", missed=True, missed_why="the run had finished")
    good = chaos_run([landed("session", 27, 20), late])
    assert [outcome(k, good) for k in good.kills] == ["survived", "missed"]
    assert [k["outcome"] for k in good.to_dict()["kills"]] == ["survived", "missed"]

    never = Kill("checkpoint", "inside a checkpoint write", missed=True, missed_why="the run ended by itself")
    bad = chaos_run([landed("driver", 45, 40), never], identical=False)
    assert [outcome(k, bad) for k in bad.kills] == ["failed", "missed"]  # missed even in a run that failed

    s = summarize([good, bad])
    assert (s["kills"], s["kills_survived"], s["kills_failed"], s["missed"]) == (2, 1, 1, 2)
    assert s["missed_why"] == ["the run had finished", "the run ended by itself"]
    assert s["steps_redone_max"] == 7 and s["by_kind"]["time"] == 0  # a missed kill is in no figure


def test_only_missed_kills_survive_nothing():
    s = summarize([chaos_run([Kill("time", "30 s", missed=True, missed_why="the run had finished")])])
    assert (s["kills"], s["kills_survived"], s["missed"], s["steps_redone_mean"]) == (0, 0, 1, None)


# ---------------------------------------------------------------- _kill on fake run folders


@pytest.fixture
def gone():
    """A process, its own session, that has exited and been reaped: (its runs.Process fields, its sid)."""
    p = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, start_new_session=True
    )
    proc = runs.Process.of(p.pid)
    p.stdin.close()
    p.wait()
    return asdict(proc), p.pid


def fake_run(tmp_path, gone, state: str) -> dict[str, str]:
    """Run 'r' whose driver is `gone`, its record saying `state`, its log at step 12; returns its env."""
    path = tmp_path / "r"
    (path / "logs").mkdir(parents=True)
    driver, session = gone
    record = runs.RunRecord(
        name="r", mode="local", state=state, preset="tiny", created=0.0, updated=0.0, store="file:///s",
        checkpoints="file:///s/runs/r/checkpoints", driver=driver, session=session,
    )  # fmt: skip
    runs.write_record(path, record)
    (path / runs.LOG).write_text("".join(f"step {s:6d} | loss 5.0\n" for s in range(1, 13)))
    (path / "logs" / "worker-0.pid").write_text(str(driver["pid"]))
    return {"LMCTL_RUNS_DIR": str(tmp_path)}


@pytest.mark.parametrize(
    "kind, when, state, why",
    [
        ("checkpoint", "checkpoint.after_file:2", "finished", "the run ended by itself (finished)"),
        ("staging", "stage.after_shard:1", "failed", "the run ended by itself (failed)"),
        ("session", 12, "running", "no process of the run was left to kill"),
        ("driver", 12, "running", "the driver was already gone"),
        ("worker", 12, "running", "the worker was already gone"),
    ],
)
def test_a_kill_that_found_nothing_to_kill_is_missed(tmp_path, gone, kind, when, state, why):
    env = fake_run(tmp_path, gone, state)
    kill = chaos._kill(env, "r", kind, when, started=0.0, since=0)
    assert kill.missed and kill.missed_why.startswith(why), kill


def test_a_fault_point_kill_that_landed_is_not_missed(tmp_path, gone):
    """The driver died with its record still saying running: only a kill does that."""
    env = fake_run(tmp_path, gone, "running")
    kill = chaos._kill(env, "r", "checkpoint", "checkpoint.after_file:1", started=0.0, since=0)
    assert not kill.missed and kill.offset == len(chaos.log_text(env, "r"))
