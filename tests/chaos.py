"""Kill a local run at chosen instants and check what it promises: it finishes, it never loads a torn
checkpoint, it redoes fewer than two checkpoint intervals of logged steps per kill (one, plus what it trained
while the next checkpoint was being written: training does not wait for uploads), and its per-step losses
equal an uninterrupted run's bit for bit. Used by tests/test_local_runs.py (a few kills) and
bench/chaos.py (many); no pytest here.

Every command goes through the CLI in a subprocess, as a user types it. The kinds of kill:

- session: SIGKILL of every process of the run (driver, Ray, workers) when it has logged a chosen step:
  a machine that loses power.
- time: the same at a chosen number of seconds after the (re)start, wherever the run is then (staging,
  Ray's start, training, an evaluation, a checkpoint write).
- checkpoint: LMCTL_FAULT="checkpoint.<point>:<n>:SESSION" in the environment of the (re)start, so the whole
  session dies at that point of the n-th checkpoint write (model/faults.py): inside the write, for certain.
- staging: LMCTL_FAULT="stage.after_shard:<n>:SESSION" on a cold store: inside staging, for certain.
- driver: SIGKILL of the driver process alone; `lmctl status` must say failed, `lmctl resume` reaps the rest.
- worker: SIGKILL of one Ray Train worker; Ray restarts the worker group by itself (no resume typed).

The run's own log (driver.log) is the record: it holds every logged step and every "resumed from checkpoint
at step K" line, even where metrics.jsonl was cut back at a resume.

Each kill's outcome (`outcome`): missed, when it never landed (the run had already finished, the process to
kill was already gone, or the run never reached the fault point and ended by itself: its record says how it
ended, which a killed driver cannot write); survived, when it landed and the run kept every promise;
failed otherwise. A missed kill proves nothing, so it is never counted as survived.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model.checkpoint import Checkpointer
from model.metrics import read_metrics
from orchestrator import runs

REPO = Path(__file__).resolve().parent.parent
STEPS, CHECKPOINT_EVERY = 80, 20
# 80 steps, a loss logged every step, checkpoints every 20: short, yet long enough to kill in the middle.
SHORT = ["--override", f"train.steps={STEPS}", "--override", "train.log_every=1"]
SHORT += ["--override", "train.eval_every=40", "--override", f"train.checkpoint_every={CHECKPOINT_EVERY}"]
KINDS = ("session", "time", "checkpoint", "staging", "driver", "worker")
CHECKPOINT_POINTS = ("checkpoint.after_file", "checkpoint.before_commit")

STEP_LINE = re.compile(r"^step +(\d+) \| loss ", re.M)
RESUMED_LINE = re.compile(r"resumed from checkpoint at step (\d+)")
UNUSABLE_LINE = re.compile(r"checkpoint step \d+ is unusable")


def lab_env(base: Path) -> dict[str, str]:
    """Environment of a lab's runs: their own runs folder and cache (the store defaults into the runs
    folder); wandb offline; nothing of the caller's lmctl settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCTL_", "WANDB_"))}
    env.update(LMCTL_RUNS_DIR=str(base / "runs"), LMCTL_CACHE=str(base / "cache"), WANDB_MODE="offline")
    return env


def lmctl(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
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


def log_text(env: dict[str, str], name: str) -> str:
    path = run_path(env, name) / runs.LOG
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_text(env: dict[str, str], name: str, text: str, timeout: float = 240) -> None:
    """Until the run's log holds `text` (polls it; fails on timeout or if the run ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log_text(env, name):
            return
        if (run_path(env, name) / runs.RUN_RECORD).exists():
            record = runs.read_record(run_path(env, name))
            ended = f"run ended before its log said {text!r}: {record.message}"
            assert runs.effective_state(record) in ("created", *runs.ACTIVE), ended
        time.sleep(0.05)
    raise AssertionError(f"run {name}'s log did not say {text!r} in {timeout} s")


def wait_for_step(env: dict[str, str], name: str, step: int, timeout: float = 240) -> None:
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
        time.sleep(0.05)
    raise AssertionError(f"run {name} did not reach step {step} in {timeout} s")


def wait_until_dead(env: dict[str, str], name: str, timeout: float = 240) -> None:
    """Until the run's driver is gone (killed from inside by a fault point, or ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not runs.driver_alive(runs.read_record(run_path(env, name))):
            return
        time.sleep(0.05)
    raise AssertionError(f"run {name}'s driver still alive after {timeout} s")


def wait_for_restart(env: dict[str, str], name: str, after: int, timeout: float = 240) -> None:
    """Until the run's log holds more than `after` "resumed from checkpoint" lines (Ray restarted workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(RESUMED_LINE.findall(log_text(env, name))) > after:
            return
        assert runs.driver_alive(runs.read_record(run_path(env, name))), "the run ended instead"
        time.sleep(0.05)
    raise AssertionError(f"run {name}: no restart of its workers in {timeout} s")


def nothing_left(env: dict[str, str], name: str) -> bool:
    record = runs.read_record(run_path(env, name))
    return bool(record.session) and runs.session_pids(record.session) == []


def checkpoint_dirs(env: dict[str, str], name: str) -> tuple[list[int], list[int]]:
    """(committed steps, step folders without a valid COMMIT) of a run's checkpoints in its store, now."""
    c = Checkpointer(runs.read_record(run_path(env, name)).checkpoints, cache_dir=Path(env["LMCTL_CACHE"]))
    committed = c.committed_steps()
    return committed, [s for s in c._all_steps() if s not in committed]


@dataclass
class Kill:
    """One kill and what the next start made of it."""

    kind: str
    at: str  # the instant, in words
    missed: bool = False  # the kill never landed (see `missed_why`): neither survived nor failed
    missed_why: str | None = None  # e.g. "the run had finished", "the run ended by itself (finished)"
    offset: int = 0  # the length of the run's log at the kill
    last_logged: int = 0  # the highest step in the log when the run died
    committed: list[int] = field(default_factory=list)  # committed checkpoints then (not for worker kills)
    half_written: list[int] = field(default_factory=list)  # step folders the kill left without a COMMIT
    status_after: str | None = None  # what `lmctl status` said right after (driver, session, ... kills)
    resumed_at: int | None = None  # the checkpoint step the next start loaded (0: none, from scratch)
    seconds: float = 0.0  # from the kill to the next start's first logged step

    @property
    def redone(self) -> int:
        return max(0, self.last_logged - (self.resumed_at or 0))


@dataclass
class ChaosRun:
    name: str
    kills: list[Kill]
    finished: bool
    state: str
    launches: int
    identical: bool  # per-step losses equal the reference's, bit for bit
    first_difference: str | None
    torn_loaded: int  # "checkpoint step N is unusable" lines: a committed checkpoint that failed verification
    leftovers: bool  # any process of the run's session still alive at the end
    seconds: float

    @property
    def kept_promises(self) -> bool:
        return self.finished and self.identical and self.torn_loaded == 0 and not self.leftovers

    def to_dict(self) -> dict:
        out = asdict(self)
        for k, kill in zip(out["kills"], self.kills, strict=True):
            k["redone"] = kill.redone
            k["outcome"] = outcome(kill, self)
        return out


def outcome(kill: Kill, run: ChaosRun) -> str:
    """missed: the kill never landed; survived: it landed and the run kept every promise; failed: it landed
    and the run broke one (a run's promises are judged at its end, so every landed kill of it shares them)."""
    if kill.missed:
        return "missed"
    return "survived" if run.kept_promises else "failed"


def plan_kills(rng: random.Random, kinds: list[str]) -> list[tuple[str, float | int | str]]:
    """A seeded instant for each kill, in order: steps rise from kill to kill so each lands in new work."""
    plan: list[tuple[str, float | int | str]] = []
    step = 0
    for kind in kinds:
        if kind in ("session", "driver", "worker"):
            step = rng.randrange(step + 3, max(step + 4, min(step + 30, STEPS - 2)))
            plan.append((kind, step))
        elif kind == "time":
            plan.append((kind, round(rng.uniform(1.0, 30.0), 2)))  # a cold start to the end is ~30-40 s
        elif kind == "checkpoint":
            n = rng.randint(1, 2)  # the n-th checkpoint write after this start
            plan.append((kind, f"{rng.choice(CHECKPOINT_POINTS)}:{n}"))
            step = max(step, n * CHECKPOINT_EVERY)
        elif kind == "staging":
            plan.append((kind, f"stage.after_shard:{rng.randint(1, 2)}"))
        else:
            raise ValueError(f"unknown kill kind {kind!r}; use one of {KINDS}")
    return plan


def chaos_run(
    env: dict[str, str],
    name: str,
    plan: list[tuple[str, float | int | str]],
    reference: list[tuple[int, float]],
    extra: list[str] = (),
) -> ChaosRun:
    """Launch `name` (tiny preset, SHORT schedule), apply the kills of `plan` in order, resuming after
    each, let it finish; then compare with `reference`. A staging kill must come first (the store must be
    cold: give a fresh `--store` in `extra`)."""
    t0 = time.monotonic()
    kills: list[Kill] = []
    fault = _fault_of(plan[0]) if plan else None
    started = _start(env, name, fault, ["launch", "--config", "tiny", "--name", name, *SHORT, *extra])
    since = 0  # where the log of the current worker group begins
    for i, (kind, when) in enumerate(plan):
        kill = _kill(env, name, kind, when, started, since)
        kills.append(kill)
        if kill.missed:
            break  # the run had already finished: nothing to resume, and no later kill can land
        t_kill = time.monotonic()
        if kind != "worker":  # Ray restarts a worker group by itself; the rest need `lmctl resume`
            kill.status_after = status(env, name)["state"]
            kill.committed, kill.half_written = checkpoint_dirs(env, name)
            nxt = _fault_of(plan[i + 1]) if i + 1 < len(plan) else None
            started = _start(env, name, nxt, ["resume", name])
        kill.last_logged, kill.resumed_at, since = _after_restart(env, name, kill.offset)
        kill.seconds = round(time.monotonic() - t_kill, 2)
    done = lmctl(env, "logs", name, "-f", timeout=300)
    assert done.returncode in (0, 1), done.stderr
    s = status(env, name)
    got = losses(env, name)
    pairs = zip(got, reference, strict=False)
    diff = next((f"step {a[0]}: {a[1]!r} != {b[1]!r}" for a, b in pairs if a != b), None)
    if diff is None and len(got) != len(reference):
        diff = f"{len(got)} losses logged, the reference has {len(reference)}"
    text = log_text(env, name)
    return ChaosRun(
        name=name,
        kills=kills,
        finished=s["state"] == "finished" and s["step"] == STEPS,
        state=s["state"],
        launches=s["launches"],
        identical=diff is None,
        first_difference=diff,
        torn_loaded=len(UNUSABLE_LINE.findall(text)),
        leftovers=not nothing_left(env, name),
        seconds=round(time.monotonic() - t0, 1),
    )


def _fault_of(item: tuple[str, float | int | str]) -> str | None:
    kind, when = item
    return f"{when}:SESSION" if kind in ("checkpoint", "staging") else None


def _start(env: dict[str, str], name: str, fault: str | None, args: list[str]) -> float:
    """Launch or resume, with LMCTL_FAULT set for this start only; the monotonic time it was typed."""
    t = time.monotonic()
    out = lmctl({**env, "LMCTL_FAULT": fault} if fault else env, *args)
    assert out.returncode == 0, f"lmctl {' '.join(args[:2])}: {out.stderr}"
    return t


def _kill(
    env: dict[str, str], name: str, kind: str, when: float | int | str, started: float, since: int
) -> Kill:
    """Apply one kill; returns it with the log's length at that instant (where the next start begins)."""
    path = run_path(env, name)
    if kind in ("checkpoint", "staging"):  # the run kills itself at the fault point
        wait_until_dead(env, name)
        at = f"inside {'a checkpoint write' if kind == 'checkpoint' else 'staging'}: {when}"
    elif kind == "time":
        time.sleep(max(0.0, started + float(when) - time.monotonic()))  # the chosen instant, not a sync
        at = f"{float(when):.2f} s after the start"
        if runs.effective_state(runs.read_record(path)) == "finished":
            return Kill(kind, at, missed=True, missed_why="the run had finished")
        if not runs.kill_session(runs.read_record(path).session, signal.SIGKILL):
            return Kill(kind, at, missed=True, missed_why="no process of the run was left to kill")
    else:
        _wait_for_logged(env, name, int(when), since)
        record = runs.read_record(path)
        at = f"after step {when} was logged" + (f" (rank {int(when) % 2})" if kind == "worker" else "")
        if kind == "session":
            if not runs.kill_session(record.session, signal.SIGKILL):
                return Kill(kind, at, missed=True, missed_why="no process of the run was left to kill")
        else:
            rank = int(when) % 2  # either worker: rank 0 holds the checkpoint writer, rank 1 does not
            try:
                pid = (
                    record.driver["pid"]
                    if kind == "driver"
                    else int(path.joinpath("logs", f"worker-{rank}.pid").read_text())
                )
                os.kill(pid, signal.SIGKILL)  # after the driver alone, `lmctl resume` reaps what is left
            except (ProcessLookupError, FileNotFoundError) as e:
                return Kill(kind, at, missed=True, missed_why=f"the {kind} was already gone ({e})")
    if kind != "worker":
        wait_until_dead(env, name)
        ended = runs.read_record(path).state  # a killed driver cannot write how it ended
        if ended not in runs.ACTIVE:  # a fault point never reached, or a kill that came too late
            return Kill(kind, at, missed=True, missed_why=f"the run ended by itself ({ended})")
    return Kill(kind, at, offset=len(log_text(env, name)))


def _wait_for_logged(env: dict[str, str], name: str, step: int, since: int, timeout: float = 240) -> None:
    """Until the current worker group (its log begins at `since`) has logged `step`. The log, not
    metrics.jsonl: that still holds the steps a resumed group is about to redo until it cuts them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _last_step(log_text(env, name)[since:]) >= step:
            return
        alive = runs.driver_alive(runs.read_record(run_path(env, name)))
        assert alive, f"run {name} ended before step {step}"
        time.sleep(0.05)
    raise AssertionError(f"run {name} did not reach step {step} in {timeout} s")


def _after_restart(env: dict[str, str], name: str, killed_at: int) -> tuple[int, int, int]:
    """(the highest step logged before the new worker group started, the checkpoint step it loaded (0: it
    started from scratch), where the new group's log begins). The log of a killed worker group may run on
    briefly past `killed_at` (the other rank finishing its step): the new "workers started" line is the
    boundary."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = log_text(env, name)
        boundary = text.find("workers started", killed_at)
        if boundary >= 0:
            after = text[boundary:]
            resumed, step = RESUMED_LINE.search(after), STEP_LINE.search(after)
            if resumed and (step is None or resumed.start() < step.start()):
                return _last_step(text[:boundary]), int(resumed[1]), boundary
            if step:
                return _last_step(text[:boundary]), 0, boundary
        record = runs.read_record(run_path(env, name))
        if not runs.driver_alive(record) and runs.effective_state(record) != "created":
            text = log_text(env, name)
            if text.find("workers started", killed_at) < 0:
                return _last_step(text), 0, len(text)  # killed again before its workers started
        time.sleep(0.05)
    raise AssertionError(f"run {name} did not start again")


def _last_step(text: str) -> int:
    return max((int(s) for s in STEP_LINE.findall(text)), default=0)


def summarize(chaos: list[ChaosRun]) -> dict:
    """The figures the bench reports: trials, kills survived, failed and missed, steps redone per kill (mean,
    max). `kills` counts the kills that landed (survived + failed); a missed one is in none of the figures."""
    kills = [k for c in chaos for k in c.kills if not k.missed]
    redone = [k.redone for k in kills]
    outcomes = [outcome(k, c) for c in chaos for k in c.kills]
    return {
        "runs": len(chaos),
        "kills": len(kills),
        "missed": outcomes.count("missed"),
        "missed_why": [k.missed_why for c in chaos for k in c.kills if k.missed],
        "kills_survived": outcomes.count("survived"),
        "kills_failed": outcomes.count("failed"),
        "by_kind": {kind: sum(k.kind == kind for k in kills) for kind in KINDS},
        "steps_redone_mean": round(sum(redone) / len(redone), 2) if redone else None,
        "steps_redone_max": max(redone, default=None),
        "over_one_interval": sum(r > CHECKPOINT_EVERY for r in redone),  # a kill during an upload: allowed
        "over_two_intervals": sum(r > 2 * CHECKPOINT_EVERY for r in redone),  # the guarantee broken
        "half_written_seen": sum(len(k.half_written) for k in kills),
        "torn_loaded": sum(c.torn_loaded for c in chaos),
        "runs_identical": sum(c.identical for c in chaos),
    }


def stage_twice_at_once(env: dict[str, str], store: str, machines: int, base: Path) -> dict:
    """Two `lmctl stage` of the shipped corpus into `store` at the same instant, from one machine (one
    cache: the second waits for the first, then reuses its commit) or from two (two caches: both upload
    the same bytes). Returns what came of it; "one_copy" and "verified" are what must hold."""
    from model.config import DEFAULT_CORPUS
    from model.shards import verify
    from model.staged import fetch_dataset
    from model.store import open_store

    args = [sys.executable, "-m", "orchestrator.cli", "stage", "--dataset", str(DEFAULT_CORPUS)]
    args += ["--store", store, "--vocab-size", "1024", "--tokenizer-sample-mb", "0.3", "--max-tokens", "200K"]
    args += ["--shard-tokens", "65536", "--json"]
    envs = [{**env, "LMCTL_CACHE": str(base / f"machine-{i % machines}")} for i in range(2)]
    procs = [
        subprocess.Popen(args, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in envs
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    results = [json.loads(out) if code == 0 else None for (out, _), code in zip(outs, codes, strict=True)]
    uris = sorted({r["dataset_uri"] for r in results if r})
    copies = sorted({k.split("/")[1] for k in open_store(store).list("datasets/")})
    verified = False
    if len(uris) == 1:
        staged = fetch_dataset(uris[0], base / "reader", wait_all=True)
        verify(staged.local_dir, staged.manifest, checksums=True)  # raises on any wrong byte
        verified = True
    return {
        "machines": machines,
        "exit_codes": codes,
        "errors": [err.strip().splitlines()[-1:] for (_, err), code in zip(outs, codes, strict=True) if code],
        "reused": [r["reused"] for r in results if r],
        "waited": sum("waiting for another staging" in err for _, err in outs),
        "dataset_uris": uris,
        "copies": copies,
        "one_copy": len(uris) == 1 and len(copies) == 1,
        "verified": verified,
    }
