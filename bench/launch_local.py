"""`lmctl launch --mode local`: time to the first step, the smoke run, CLI start-up, Ray's per-step overhead.

    python -m bench.launch_local                 # everything, ~7 minutes on 2 idle cores
    python -m bench.launch_local --quick         # one repetition each, ~4 minutes
    python -m bench.launch_local --only ttfs     # one measurement: ttfs, smoke, cli or overhead

Every run gets fresh temp folders for its runs, store and data cache (LMCTL_RUNS_DIR, LMCTL_CACHE set,
LMCTL_STORE unset, in the environment of the subprocesses only), and every command runs as a subprocess
through the venv's `lmctl`, as a user would run it:

- ttfs: wall time from starting `lmctl launch --mode local --config tiny --override train.log_every=1
  --override train.steps=30` (detached) to the `time` of the first train record in metrics.jsonl; cold
  (empty store and cache: staging included) and warm (a second run on the same store and cache). The
  driver's log is watched while it runs, so each line's arrival time gives where the time goes.
- smoke: `lmctl launch --mode local --config tiny --foreground` (the README smoke command, 200 steps), cold
  store, start to exit; final loss and val loss from metrics.jsonl.
- cli: `lmctl --help` and `lmctl status` (empty runs folder) against `python -c pass`, best and median of N.
- overhead: steady-state seconds per step of the tiny preset (150 steps, logged every 10): `lmctl train`
  (one plain process) vs `lmctl launch --workers 1`, and `torchrun --nproc_per_node 2 -m model.train` vs
  `lmctl launch --workers 2`. Step time = median over logging intervals of (time difference / steps),
  skipping intervals that contain an evaluation or a checkpoint and the first record (warm-up).

Goals are judged on the best repetition (nearest to an idle machine); medians are printed beside them.
Written to bench/results/launch_local.json. Never passes or fails on time. Every run the bench starts is
stopped on the way out (`lmctl stop`, then its session is killed), and the bench checks that none of its
processes is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import RESULTS_DIR, print_table, write_json

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin/ (not resolved: the venv's python is a symlink)
LMCTL = str(BIN / "lmctl")
TORCHRUN = str(BIN / "torchrun")
TERMINAL = ("finished", "stopped", "failed")
MEASUREMENTS = ("ttfs", "smoke", "cli", "overhead")
GOALS = {"ttfs_s": 15.0, "smoke_s": 90.0, "cli_ratio": 5.0, "overhead": 0.10}

# driver.log lines that mark the phases of a launch (orchestrator/driver.py, orchestrator/worker.py)
PHASES = [
    ("staging_started", re.compile(r"\] staging ")),
    ("staged", re.compile(r"\] (staged|reused) [\d,]+ tokens")),
    ("ray_up", re.compile(r"\] Ray up in")),
    ("workers_starting", re.compile(r"\] starting \d+ (CPU|GPU) workers")),
    ("workers_started", re.compile(r"\] \d+ workers started")),
]


RAY_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_[\d-]+_\d+_(\d+)\b")

# Ray's process titles in the run's session that mark the steps of starting the training workers
RAY_STAGES = [
    ("controller", "ray::TrainController"),
    ("worker actors", "ray::RayTrainWorker"),
]


def ray_stages(procs: dict[str, float]) -> dict[str, float]:
    out = {}
    for label, prefix in RAY_STAGES:
        seen = [t for title, t in procs.items() if title.startswith(prefix)]
        if seen:
            out[label] = min(seen)
    return out


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def best(xs: list[float]) -> float | None:
    return min(xs) if xs else None


# ---------------------------------------------------------------- environments and cleanup


class Bench:
    """Owns the temp folders and every process the bench starts; cleanup() leaves nothing running."""

    def __init__(self, keep: bool = False):
        self.root = Path(tempfile.mkdtemp(prefix="lmctl-bench-launch-"))
        self.keep = keep
        self.runs: list[tuple[dict[str, str], Path]] = []  # (env, run dir) of every launched run
        self.procs: list[subprocess.Popen] = []  # plain processes (lmctl train, torchrun), own sessions
        self.sessions: set[int] = set()
        self.drivers: set[int] = set()  # driver pids: Ray names its session folder after the driver's pid
        self._n = 0

    def env(self, label: str) -> dict[str, str]:
        """A fresh runs folder and data cache (the store defaults to <runs>/store)."""
        self._n += 1
        base = self.root / f"{self._n:02d}-{label}"
        (base / "runs").mkdir(parents=True)
        env = dict(os.environ)
        env.pop("LMCTL_STORE", None)
        env.pop("OMP_NUM_THREADS", None)  # each launcher picks its own thread count, as for a user
        env.update(
            LMCTL_RUNS_DIR=str(base / "runs"),
            LMCTL_CACHE=str(base / "cache"),
            PYTHONUNBUFFERED="1",
            RAY_USAGE_STATS_ENABLED="0",
        )
        return env

    def track_run(self, env: dict[str, str], name: str) -> Path:
        path = Path(env["LMCTL_RUNS_DIR"]) / name
        self.runs.append((env, path))
        return path

    def popen(self, cmd: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, **kw)
        self.procs.append(proc)
        self.sessions.add(proc.pid)
        return proc

    def cleanup(self) -> list[str]:
        """Stop what is still running; returns the processes that had to be killed at the end (should be
        none), as 'pid cmdline'."""
        for proc in self.procs:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        for env, path in self.runs:
            record = _read_json(path / "run.json")
            if not record:
                continue  # never rendered (launch refused it)
            if record.get("session"):
                self.sessions.add(int(record["session"]))
            if record.get("driver"):
                self.drivers.add(int(record["driver"]["pid"]))
            if record.get("state") not in TERMINAL or _alive(record.get("driver")):
                print(f"stopping leftover run {path.name}", flush=True)
                subprocess.run(
                    [LMCTL, "stop", path.name, "--timeout", "30"],
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=90,
                )
        time.sleep(0.5)
        left = self.leftovers()
        for pid, _ in left:
            _kill(pid)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        return [f"{pid} {cmd}" for pid, cmd in left]

    def leftovers(self) -> list[tuple[int, str]]:
        """Live processes in a session the bench started, naming its temp folder, or belonging to the Ray
        instance of one of its drivers (/tmp/ray/session_<date>_<driver pid>), as `ps` would show them."""
        out = []
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] == "Z":
                continue
            ray = RAY_SESSION.search(cmd)
            if (
                int(fields[3]) in self.sessions
                or str(self.root) in cmd
                or (ray and int(ray.group(1)) in self.drivers)
            ):
                out.append((int(entry.name), cmd[:160]))
        return out


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _alive(driver: dict | None) -> bool:
    """The run record's driver process (pid + start time) still running."""
    if not driver:
        return False
    try:
        stat = Path(f"/proc/{driver['pid']}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] != "Z" and (
        driver.get("start_ticks") is None or int(fields[19]) == driver["start_ticks"]
    )


def session_titles(sid: int) -> list[str]:
    """Short names of the live processes in session `sid`: Ray's process titles (ray::TrainController...),
    else the program and its first arguments."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) != sid or fields[0] == "Z":
                continue
            parts = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        parts = " ".join(parts).split()
        if not parts:
            continue
        if parts[0].startswith("ray::"):
            out.append(parts[0])
        else:
            out.append(" ".join(Path(p).name if "/" in p else p for p in parts[:3]))
    return out


def _nice(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[16])


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def train_records(metrics: list[dict]) -> list[dict]:
    return [r for r in metrics if "loss" in r and "val_loss" not in r and "checkpoint" not in r]


# ---------------------------------------------------------------- one detached run, watched


@dataclass
class Watched:
    name: str
    state: str | None = None
    exit_code: int | None = None
    message: str | None = None
    timed_out: bool = False
    launch_cmd_s: float | None = None  # `lmctl launch` until it returned
    created_s: float | None = None  # run.json's created - t0
    first_step_s: float | None = None  # first train record's time - t0
    end_s: float | None = None  # the run seen ended - t0
    phases: dict[str, float] = field(default_factory=dict)  # driver.log line seen - t0
    worker_nice: int | None = None
    procs: dict[str, float] = field(
        default_factory=dict
    )  # process title first seen in the run's session - t0
    metrics: list[dict] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)


def launch_and_watch(
    bench: Bench, env: dict, name: str, overrides: list[str], workers: int = 2, timeout: float = 600
) -> Watched:
    """`lmctl launch` a tiny run (detached) and follow its files until it ends; times are from the launch."""
    path = bench.track_run(env, name)
    cmd = [LMCTL, "launch", "--mode", "local", "--config", "tiny", "--name", name, "--workers", str(workers)]
    for o in overrides:
        cmd += ["--override", o]
    w = Watched(name)
    t0 = time.time()
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    w.launch_cmd_s = time.time() - t0
    if out.returncode != 0:
        raise RuntimeError(
            f"lmctl launch failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}"
        )
    log, metrics_path, pos, buf, lines = path / "logs" / "driver.log", path / "metrics.jsonl", 0, b"", []
    deadline = time.monotonic() + timeout
    sid = _read_json(path / "run.json").get("session")
    polls = 0
    while True:
        now = time.time() - t0
        if sid and polls % 4 == 0:  # ~1.5 ms of CPU per scan of /proc, every 0.2 s
            for title in session_titles(sid):
                w.procs.setdefault(title, now)
        polls += 1
        if log.exists():
            with open(log, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            pos += len(chunk)
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                lines.append(line)
                for phase, pattern in PHASES:
                    if phase not in w.phases and pattern.search(line):
                        w.phases[phase] = now
        if w.worker_nice is None and (path / "logs" / "worker-0.pid").exists():
            with contextlib.suppress(ValueError):
                w.worker_nice = _nice(int((path / "logs" / "worker-0.pid").read_text()))
        if w.first_step_s is None and metrics_path.exists():
            first = train_records(read_metrics(metrics_path))
            if first:
                w.first_step_s = first[0]["time"] - t0
        record = _read_json(path / "run.json")
        if record.get("state") in TERMINAL and not _alive(record.get("driver")):
            break
        if record.get("driver") and not _alive(record["driver"]) and record.get("state") not in TERMINAL:
            record["state"] = "failed"  # the driver died without saying so
            break
        if time.monotonic() > deadline:
            w.timed_out = True
            break
        time.sleep(0.05)
    w.end_s = time.time() - t0
    w.state, w.exit_code, w.message = record.get("state"), record.get("exit_code"), record.get("message")
    w.created_s = record["created"] - t0 if record.get("created") else None
    w.metrics = read_metrics(metrics_path)
    if w.first_step_s is None and train_records(w.metrics):
        w.first_step_s = train_records(w.metrics)[0]["time"] - t0
    w.log_tail = lines[-15:]
    if w.timed_out:
        subprocess.run([LMCTL, "stop", name, "--timeout", "30"], env=env, cwd=REPO, capture_output=True)
        raise RuntimeError(f"run {name} did not end within {timeout:.0f} s; stopped it")
    if w.state != "finished":
        tail = "\n  ".join(w.log_tail)
        raise RuntimeError(f"run {name} ended {w.state}: {w.message}\n  {tail}")
    return w


# ---------------------------------------------------------------- the four measurements


def measure_ttfs(bench: Bench, reps: int) -> dict[str, Any]:
    """Cold (fresh store and cache) then warm (same store and cache) runs, `reps` pairs."""
    overrides = ["train.log_every=1", "train.steps=30"]
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    for rep in range(reps):
        env = bench.env("ttfs")
        for kind in ("cold", "warm"):
            w = launch_and_watch(bench, env, f"ttfs-{kind}-{rep}", overrides, timeout=300)
            runs[kind].append(
                {
                    "first_step_s": w.first_step_s,
                    "launch_cmd_s": w.launch_cmd_s,
                    "created_s": w.created_s,
                    "phases_s": {**w.phases, **ray_stages(w.procs)},
                    "processes_first_seen_s": w.procs,
                    "end_s": w.end_s,
                    "worker_nice": w.worker_nice,
                    "loadavg_1m": os.getloadavg()[0],
                }
            )
            print(
                f"ttfs {kind} {rep + 1}/{reps}: first step after {w.first_step_s:.1f} s (phases: "
                f"{', '.join(f'{k} {v:.1f}' for k, v in w.phases.items())}; run ended {w.end_s:.1f} s)",
                flush=True,
            )
    return runs


def measure_smoke(bench: Bench) -> dict[str, Any]:
    """The README's smoke command, foreground, cold store: wall time to exit, losses, log lines' times."""
    env = bench.env("smoke")
    name = "smoke"
    path = bench.track_run(env, name)
    cmd = [LMCTL, "launch", "--mode", "local", "--config", "tiny", "--foreground", "--name", name]
    lines: list[tuple[float, str]] = []
    t0 = time.time()
    proc = bench.popen(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.time() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    procs: dict[str, float] = {}
    sid = None
    while True:  # trace the run's processes as ttfs does, until the command exits
        now = time.time() - t0
        sid = sid or _read_json(path / "run.json").get("session")
        if sid:
            for title in session_titles(sid):
                procs.setdefault(title, now)
        if now > 600:
            subprocess.run([LMCTL, "stop", name, "--timeout", "30"], env=env, cwd=REPO, capture_output=True)
            raise RuntimeError("the smoke run did not end within 600 s; stopped it")
        try:
            code = proc.wait(0.2)
            break
        except subprocess.TimeoutExpired:
            pass
    wall = time.time() - t0
    reader.join(5)
    metrics = read_metrics(path / "metrics.jsonl")
    train = train_records(metrics)
    evals = [r for r in metrics if "val_loss" in r]
    phases = {}
    for t, line in lines:
        for phase, pattern in PHASES:
            if phase not in phases and pattern.search(line):
                phases[phase] = t
    result = {
        "exit_code": code,
        "wall_s": wall,
        "first_step_s": train[0]["time"] - t0 if train else None,
        "last_step_s": train[-1]["time"] - t0 if train else None,
        "phases_s": {**phases, **ray_stages(procs)},
        "processes_first_seen_s": procs,
        "steps": train[-1]["step"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "final_val_bpb": evals[-1].get("val_bpb") if evals else None,
        "final_tasks": next((r["evals"] for r in reversed(metrics) if "evals" in r), {}),
        "untrained_tasks": untrained_tasks(path),
        "final_samples": next((r["samples"] for r in reversed(metrics) if "samples" in r), {}),
        "loadavg_1m": os.getloadavg()[0],
    }
    if code != 0:
        tail = "\n  ".join(line for _, line in lines[-15:])
        raise RuntimeError(f"the smoke run exited {code}:\n  {tail}")
    print(
        f"smoke: {wall:.1f} s to exit (first step {result['first_step_s']:.1f} s, last step "
        f"{result['last_step_s']:.1f} s), loss {result['final_loss']:.3f}, "
        f"val loss {result['final_val_loss']:.3f}, val bpb {result['final_val_bpb']:.3f}; tasks "
        + ", ".join(
            f"{t}: acc {r['acc']:.3f} (untrained {result['untrained_tasks'][t]['acc']:.3f}, "
            f"chance {r['chance']:.2f})"
            for t, r in result["final_tasks"].items()
        ),
        flush=True,
    )
    return result


def untrained_tasks(path: Path) -> dict[str, Any]:
    """The run's tasks scored by its model before any step (the same seed's initial weights): chance level."""
    import torch

    from model.config import load_spec
    from model.decoder import Decoder
    from model.evals import score_task
    from model.staged import fetch_tokenizer
    from model.tasks import load_task, task_name
    from model.tokenizer import Tokenizer

    spec = load_spec(path / "config.yaml")
    torch.manual_seed(spec.train.seed)
    model = Decoder(spec.model)
    tok = Tokenizer.load(fetch_tokenizer(spec.data.path, path / "untrained"))
    return {
        task_name(t): score_task(
            model, tok, load_task(t, spec.train.eval_examples), spec.model.seq_len, "cpu"
        )
        for t in spec.train.evals
    }


def measure_cli(bench: Bench, n: int) -> dict[str, Any]:
    """Interleaved, so a busy spell hits all three alike."""
    env = bench.env("cli")
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "lmctl --help": [LMCTL, "--help"],
        "lmctl status": [LMCTL, "status"],
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(n):
        for k, cmd in cmds.items():
            t = time.perf_counter()
            subprocess.run(
                cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
            )
            times[k].append(time.perf_counter() - t)
    out: dict[str, Any] = {
        k: {"runs_s": v, "best_s": best(v), "median_s": median(v)} for k, v in times.items()
    }
    base = out["python -c pass"]
    for k in ("lmctl --help", "lmctl status"):
        out[k]["ratio_best"] = out[k]["best_s"] / base["best_s"]
        out[k]["ratio_median"] = out[k]["median_s"] / base["median_s"]
    print(
        "cli: "
        + ", ".join(
            f"{k} best {1e3 * v['best_s']:.0f} ms median {1e3 * v['median_s']:.0f} ms" for k, v in out.items()
        ),
        flush=True,
    )
    return out


def step_times(metrics: list[dict]) -> dict[str, Any]:
    """Seconds per step from the train records' times; the first record (warm-up) only opens an interval,
    and intervals holding an evaluation or a checkpoint are skipped."""
    train = train_records(metrics)
    pauses = sorted({r["step"] for r in metrics if "val_loss" in r or "checkpoint" in r})
    intervals = []
    for a, b in zip(train, train[1:], strict=False):
        if any(a["step"] <= s < b["step"] for s in pauses):
            continue
        intervals.append((b["time"] - a["time"]) / (b["step"] - a["step"]))
    per_token = [r["tokens"] / r["step"] / r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
    return {
        "step_s": median(intervals),
        "step_s_intervals": intervals,
        "best_interval_s": best(intervals),  # the least disturbed stretch of 10 steps
        "step_s_from_tokens_per_s": median(per_token),
        # first train record to the last, evaluations, checkpoints and Ray's report() barrier included
        "step_s_all_in": (train[-1]["time"] - train[0]["time"]) / (train[-1]["step"] - train[0]["step"])
        if len(train) > 1
        else None,
        "steps": train[-1]["step"] if train else None,
    }


def _load() -> dict[str, float]:
    return {"loadavg_1m": os.getloadavg()[0]}


def run_plain(bench: Bench, env: dict, cmd: list[str], run_dir: Path, timeout: float = 600) -> list[dict]:
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed below
    try:
        proc = bench.popen(cmd, env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGTERM)
            raise RuntimeError(f"{' '.join(cmd[:3])} did not end within {timeout:.0f} s") from None
    finally:
        log.close()
    if code != 0:
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n  " + "\n  ".join(tail))
    return read_metrics(run_dir / "metrics.jsonl")


def measure_overhead(bench: Bench, reps: int, steps: int, plain_nice: int = 0) -> dict[str, Any]:
    """Plain process vs Ray with 1 worker, torchrun (2 processes) vs Ray with 2 workers, interleaved.
    plain_nice: run the plain processes at this niceness (Ray starts its workers at 15)."""
    nice = ["nice", "-n", str(plain_nice)] if plain_nice else []
    overrides = [f"train.steps={steps}", "train.log_every=10"]
    ov_args = [a for o in overrides for a in ("--override", o)]
    env = bench.env("overhead")
    plain_root = Path(env["LMCTL_RUNS_DIR"]).parent / "plain"
    plain_root.mkdir()
    runs: dict[str, list[dict]] = {
        "plain_1proc": [],
        "ray_1worker": [],
        "torchrun_2proc": [],
        "ray_2workers": [],
    }
    for rep in range(reps):
        run_dir = plain_root / f"plain-{rep}"
        cmd = [*nice, LMCTL, "train", "--config", "tiny", "--run-dir", str(run_dir), *ov_args]
        runs["plain_1proc"].append(step_times(run_plain(bench, env, cmd, run_dir)) | _load())

        w = launch_and_watch(bench, env, f"ray1-{rep}", overrides, workers=1)
        runs["ray_1worker"].append({**step_times(w.metrics), "worker_nice": w.worker_nice, **_load()})

        # both ranks would prepare the data into one run dir at once: give them the plain run's prepared data
        tdir = plain_root / f"torchrun-{rep}"
        cmd = [
            *nice, TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "model.train", "--config", "tiny",
            "--run-dir", str(tdir), *ov_args, "--override", f"data.path={plain_root / 'plain-0' / 'data'}",
        ]  # fmt: skip
        runs["torchrun_2proc"].append(step_times(run_plain(bench, env, cmd, tdir)) | _load())

        w = launch_and_watch(bench, env, f"ray2-{rep}", overrides, workers=2)
        runs["ray_2workers"].append({**step_times(w.metrics), "worker_nice": w.worker_nice, **_load()})
        print(
            f"overhead {rep + 1}/{reps}: s/step "
            + ", ".join(f"{k} {v[-1]['step_s'] * 1e3:.1f} ms" for k, v in runs.items()),
            flush=True,
        )
    out: dict[str, Any] = {"runs": runs, "steps": steps, "log_every": 10, "plain_nice": plain_nice}
    for k, v in runs.items():
        out[k] = {
            "best_step_s": best([r["step_s"] for r in v]),
            "median_step_s": median([r["step_s"] for r in v]),
            "best_step_s_all_in": best([r["step_s_all_in"] for r in v]),
            "best_interval_s": best([r["best_interval_s"] for r in v]),
        }
    for ray, plain in (("ray_1worker", "plain_1proc"), ("ray_2workers", "torchrun_2proc")):
        out[f"overhead_{ray}"] = out[ray]["best_step_s"] / out[plain]["best_step_s"] - 1
        out[f"overhead_{ray}_median"] = out[ray]["median_step_s"] / out[plain]["median_step_s"] - 1
        out[f"overhead_{ray}_all_in"] = out[ray]["best_step_s_all_in"] / out[plain]["best_step_s_all_in"] - 1
        out[f"overhead_{ray}_best_interval"] = out[ray]["best_interval_s"] / out[plain]["best_interval_s"] - 1
    return out


# ---------------------------------------------------------------- report


def summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(figure: str, best_v, median_v, fmt: str, goal: float | None = None, goal_text: str = "") -> None:
        rows.append(
            {
                "figure": figure,
                "best": None if best_v is None else format(best_v, fmt),
                "median": None if median_v is None else format(median_v, fmt),
                "goal": goal_text or None,
                "met": None if goal is None or best_v is None else ("yes" if best_v <= goal else "NO"),
                "best_value": best_v,
                "median_value": median_v,
                "goal_value": goal,
            }
        )

    if "ttfs" in res:
        g = GOALS["ttfs_s"]
        for kind in ("cold", "warm"):
            xs = [r["first_step_s"] for r in res["ttfs"][kind]]
            row(f"time to first step, {kind} (s)", best(xs), median(xs), ".1f", g, f"<= {g:g} s")
    if "smoke" in res:
        s, g = res["smoke"], GOALS["smoke_s"]
        row("smoke run, --foreground to exit (s)", s["wall_s"], None, ".1f", g, f"<= {g:g} s")
        row("  of which: to first step (s)", s["first_step_s"], None, ".1f")
        row("  of which: first to last step (s)", s["last_step_s"] - s["first_step_s"], None, ".1f")
        row("  last step to exit (s)", s["wall_s"] - s["last_step_s"], None, ".1f")
        row(f"smoke final loss (step {s['steps']})", s["final_loss"], None, ".3f")
        row("smoke final val loss", s["final_val_loss"], None, ".3f")
        row("smoke final val bits per byte", s.get("final_val_bpb"), None, ".3f")
        for task, r in s.get("final_tasks", {}).items():
            row(
                f"smoke {task} acc (untrained {s['untrained_tasks'][task]['acc']:.3f})", r["acc"], None, ".3f"
            )
    if "cli" in res:
        c, g = res["cli"], GOALS["cli_ratio"]
        for k in ("python -c pass", "lmctl --help", "lmctl status"):
            row(f"{k} (ms)", 1e3 * c[k]["best_s"], 1e3 * c[k]["median_s"], ".0f")
        for k in ("lmctl --help", "lmctl status"):
            row(f"{k} / python -c pass", c[k]["ratio_best"], c[k]["ratio_median"], ".2f", g, f"<= {g:g}x")
    if "overhead" in res:
        o, g = res["overhead"], GOALS["overhead"]
        for k, label in (
            ("plain_1proc", "lmctl train, 1 process"),
            ("ray_1worker", "lmctl launch --workers 1"),
            ("torchrun_2proc", "torchrun, 2 processes"),
            ("ray_2workers", "lmctl launch --workers 2"),
        ):
            row(f"step time, {label} (ms)", 1e3 * o[k]["best_step_s"], 1e3 * o[k]["median_step_s"], ".1f")
        for ray, plain in (("ray_1worker", "1 process"), ("ray_2workers", "torchrun 2")):
            row(
                f"Ray overhead per step vs {plain} (%)",
                100 * o[f"overhead_{ray}"],
                100 * o[f"overhead_{ray}_median"],
                "+.1f",
                100 * g,
                f"<= {100 * g:g}%",
            )
            row("  same, evals/ckpts/report included (%)", 100 * o[f"overhead_{ray}_all_in"], None, "+.1f")
            row(
                "  same, fastest 10-step interval (%)", 100 * o[f"overhead_{ray}_best_interval"], None, "+.1f"
            )
    return rows


def print_breakdown(res: dict[str, Any]) -> None:
    """Where the time to the first step goes: seconds after the launch at which each driver.log line
    appeared and Ray's processes for the training workers were first seen (median of the runs)."""
    cols = [
        ("launch returned", "launch_cmd_s"),
        ("driver: staging", "staging_started"),
        ("staged", "staged"),
        ("Ray up", "ray_up"),
        ("controller", "controller"),
        ("worker actors", "worker actors"),
        ("workers started", "workers_started"),
        ("first step", "first_step_s"),
    ]
    rows = []

    def phase_row(label: str, runs: list[dict]) -> dict:
        row: dict[str, Any] = {"run": label}
        for header, key in cols:
            if key in ("launch_cmd_s", "first_step_s"):
                row[header] = median([r[key] for r in runs if r.get(key) is not None])
            else:
                row[header] = median([r["phases_s"][key] for r in runs if key in r["phases_s"]])
        return row

    if "ttfs" in res:
        rows += [phase_row(f"ttfs {k}", res["ttfs"][k]) for k in ("cold", "warm")]
    if "smoke" in res:
        rows.append(phase_row("smoke", [res["smoke"]]))
    if rows:
        print(
            "\nseconds after `lmctl launch` started at which each driver.log line appeared, and Ray's "
            "processes\nfor the training workers were first seen (median):"
        )
        print_table(rows, [("run", "run", "")] + [(h, h, ".1f") for h, _ in cols])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.launch_local", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repetition of each run, 5 CLI timings")
    ap.add_argument("--only", action="append", choices=MEASUREMENTS, help="run only this (repeatable)")
    ap.add_argument("--reps", type=int, help="repetitions of the ttfs pairs and overhead runs (default 2)")
    ap.add_argument("--cli-n", type=int, help="timings per CLI command (default 10)")
    ap.add_argument(
        "--overhead-steps", type=int, default=150, help="steps of the overhead runs (default 150)"
    )
    ap.add_argument(
        "--plain-nice",
        type=int,
        default=0,
        help="niceness of the plain baselines of `overhead` (Ray runs its workers at 15; default 0)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp folders (runs, logs) for a look")
    ap.add_argument("--out", help="JSON path (default bench/results/launch_local.json; with --only, "
                    "launch_local-<names>.json)")  # fmt: skip
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 2)
    cli_n = args.cli_n or (5 if args.quick else 10)
    only = args.only or list(MEASUREMENTS)
    out_path = args.out or RESULTS_DIR / (
        "launch_local.json" if not args.only else f"launch_local-{'-'.join(only)}.json"
    )
    for tool in (LMCTL, TORCHRUN):
        if not Path(tool).exists():
            print(
                f"error: {tool} not found: run with the venv's python "
                "(.venv/bin/python -m bench.launch_local)"
            )
            return 2

    load_before = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} cores, load {load_before:.2f}; measuring: {', '.join(only)} (reps {reps})",
        flush=True,
    )
    bench = Bench(keep=args.keep)
    res: dict[str, Any] = {}
    errors: dict[str, str] = {}
    try:
        for name in only:
            try:
                if name == "ttfs":
                    res["ttfs"] = measure_ttfs(bench, reps)
                elif name == "smoke":
                    res["smoke"] = measure_smoke(bench)
                elif name == "cli":
                    res["cli"] = measure_cli(bench, cli_n)
                elif name == "overhead":
                    res["overhead"] = measure_overhead(bench, reps, args.overhead_steps, args.plain_nice)
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                errors[name] = str(e)
                print(f"{name} failed: {e}", flush=True)
    finally:
        left = bench.cleanup()
        if args.keep:
            print(f"kept {bench.root}")
    load_after = os.getloadavg()[0]

    rows = summary_rows(res)
    print()
    print_table(
        rows,
        [("figure", "figure", ""), ("best", "best", ""), ("median", "median", ""), ("goal", "goal", ""),
         ("met (best)", "met", "")],
    )  # fmt: skip
    print_breakdown(res)
    if left:
        print(f"\nWARNING: {len(left)} processes of the bench were still running at the end (killed):")
        for line in left:
            print(f"  {line}")
    else:
        print("\nnothing left running (no process in the bench's sessions or naming its temp folder)")
    if max(load_before, load_after) > 0.5 * (os.cpu_count() or 1):
        print(
            f"note: load average {load_before:.2f} -> {load_after:.2f}: other processes shared the cores, so "
            "the figures are slow and noisy"
        )
    for name, err in errors.items():
        print(f"{name} FAILED: {err.splitlines()[0]}")
    path = write_json(
        out_path,
        {
            "benchmark": "launch_local",
            "measured": only,
            "reps": reps,
            "cli_n": cli_n,
            "goals": GOALS,
            "summary": rows,
            **res,
            "errors": errors,
            "leftover_processes": left,
            "loadavg_before_after": [load_before, load_after],
        },
    )
    print(f"wrote {path}")
    return 1 if errors or left else 0


if __name__ == "__main__":
    sys.exit(main())
