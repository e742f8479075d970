"""Run directories and run records: where a run lives on this machine and what state it is in.

    runs/<name>/config.yaml    the resolved spec every worker reads (no secrets)
    runs/<name>/task.yaml      the SkyPilot task that would run it in the cloud
    runs/<name>/run.json       the record: mode, state, store URIs, backend ids (pids), timestamps
    runs/<name>/logs/          driver.log: everything the run printed
    runs/<name>/metrics.jsonl  one JSON object per logged step, evaluation and checkpoint

The record says what the run last *claimed*; `effective_state` checks the claim against the processes,
so a run whose driver died shows as failed, not running. Only the standard library is imported here:
`lmctl status` must stay instant.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.errors import ConfigError

RUN_RECORD = "run.json"
CONFIG = "config.yaml"
TASK = "task.yaml"
LOG = "logs/driver.log"
METRICS = "metrics.jsonl"
STAGING = "staging.json"  # while a run stages its data: how far (stage.StagingReport), for status and attach
STOP = "STOP"  # its presence in the store asks the workers to checkpoint and stop (StopRequest)
STOP_POLL_S = 10.0  # a run on a remote store sees a stop request at most this late, + one step


def store_prefix(name: str) -> str:
    """The folder of everything a run keeps in its store (checkpoints/, config.yaml, metrics.jsonl, STOP);
    staged datasets live beside it, under datasets/, shared by runs."""
    return f"runs/{name}"


def store_key(name: str, what: str) -> str:
    """Key of a run's file in its store: runs/<name>/<what>, beside checkpoints/. A cloud run's pods read
    config.yaml there and write metrics.jsonl there; a STOP there asks them to stop."""
    return f"{store_prefix(name)}/{what}"


# Letters, digits, '-', '_', '.'; starts with a letter or digit; at most 64 characters. Safe as a folder
# name, an object-store prefix, a Ray run name and a SkyPilot job name.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# States that claim live processes (locally) or a live job (cloud). A local run goes created -> staging ->
# running (-> stopping) -> finished, stopped or failed; a cloud run created -> starting -> running (->
# recovering after a preemption -> running) (-> stopping) -> finished, stopped or failed.
ACTIVE = ("staging", "starting", "running", "recovering", "stopping")


def runs_root(override: str | Path | None = None) -> Path:
    """Where run directories live: --runs-dir, else $LMCTL_RUNS_DIR, else ./runs."""
    return Path(override or os.environ.get("LMCTL_RUNS_DIR") or "runs").resolve()


def default_store(root: Path) -> str:
    """$LMCTL_STORE, else a file:// store beside the runs."""
    return os.environ.get("LMCTL_STORE") or f"file://{root / 'store'}"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"run name {name!r} is not allowed: use 1-64 letters, digits, '-', '_' or '.', starting with "
            "a letter or digit (no '/', spaces or '..')"
        )
    return name


def generate_name(preset: str) -> str:
    """'tiny-1122-153012-a3f9': readable, sortable by time, unique when two launches race."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(preset).stem)[:24].strip("-.") or "run"
    return f"{stem}-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass
class Process:
    """A process we started, identified beyond its pid (pids are reused): start time and session."""

    pid: int
    start_ticks: int | None  # /proc/<pid>/stat field 22, None where /proc does not exist
    host: str

    @classmethod
    def of(cls, pid: int) -> Process:
        return cls(pid, _start_ticks(pid), socket.gethostname())

    def alive(self) -> bool:
        if self.host != socket.gethostname():
            return False  # not ours to see; the cloud backend answers for remote runs
        if self.start_ticks is not None:
            return _start_ticks(self.pid) == self.start_ticks and not _is_zombie(self.pid)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces and ')'


def _start_ticks(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[19]) if f else None


def _is_zombie(pid: int) -> bool:
    f = _stat_fields(pid)
    return bool(f) and f[0] == "Z"


def session_pids(sid: int) -> list[int]:
    """Every live process in session `sid` (a detached run's driver, Ray's daemons and workers)."""
    out = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        f = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if f and f[0] != "Z" and int(f[3]) == sid and int(entry.name) != os.getpid():
            out.append(int(entry.name))
    return out


def kill_session(sid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal every process left in session `sid`; returns the pids signalled."""
    pids = session_pids(sid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return pids


@dataclass
class RunRecord:
    name: str
    mode: str
    state: str
    preset: str
    created: float
    updated: float
    store: str  # the store URI: datasets/ and runs/<name>/ live under it
    checkpoints: str  # URI of the run's checkpoints in the store
    data: str | None = None  # URI of the staged dataset, once staged
    workers: int = 1
    steps: int = 0  # total steps of the schedule
    global_batch_tokens: int = 0
    driver: dict[str, Any] | None = None  # Process fields of the detached driver
    session: int | None = None  # its session id: every process of the run shares it
    launches: int = 0  # 1 for the launch, +1 per resume
    dry_run: bool = False  # rendered by `launch --dry-run`: never started until launches > 0
    exit_code: int | None = None
    message: str | None = None  # why it failed or stopped, one line
    # cloud runs (mode "cloud"): what was asked for and SkyPilot's handle on it
    gpu: str | None = None  # e.g. "RTX5090,RTX4090:1" (gpus.GpuRequest.text)
    nodes: int = 1
    cloud: str | None = None  # None: any cloud that has the GPU
    spot: bool = False
    managed: bool = True  # a managed job (recovered after preemptions) or a plain cluster
    disk_size: int | None = None  # GB per node
    image: str | None = None
    micro_batch_size: int | None = None  # what the config asked for, before a plan lowered it to fit
    activation_checkpointing: str | None = None  # likewise, before a plan resolved `auto`
    job_id: int | None = None
    cluster: str | None = None
    price_per_hour: float | None = None  # USD for all the run's GPUs, from the plan
    job_seconds: float | None = None  # how long SkyPilot's job has run, at the last refresh
    recoveries: int | None = None
    # time and money (orchestrator/accounting.py): one [started, ended] per launch or resume, unix seconds
    # (ended None while it runs), and what the plan expected when it was rented (Plan.summary())
    segments: list[list[float | None]] = field(default_factory=list)
    plan: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def new_record(
    name: str, mode: str, state: str, preset: str, store: str, workers: int, spec: Any
) -> RunRecord:
    """The first record of a run of `spec` (a model.config.RunSpec), its checkpoints beside it in `store`."""
    now = time.time()
    return RunRecord(
        name=name,
        mode=mode,
        state=state,
        preset=preset,
        created=now,
        updated=now,
        store=store,
        checkpoints=f"{store}/{store_key(name, 'checkpoints')}",
        data=spec.data.path,
        workers=workers,
        steps=spec.train.steps,
        global_batch_tokens=spec.train.global_batch_tokens,
    )


def segments_began(record: RunRecord, now: float | None = None) -> list[list[float | None]]:
    """The record's segments with a new one open: a launch or resume started (rented, for a cloud run)."""
    return [*record.segments, [round(time.time() if now is None else now, 3), None]]


def segments_ended(record: RunRecord, now: float | None = None) -> list[list[float | None]]:
    """The record's segments with the open one closed (the run's processes have ended)."""
    segments = [list(s) for s in record.segments]
    if segments and segments[-1][1] is None:
        segments[-1][1] = round(time.time() if now is None else now, 3)
    return segments


def read_record(path: Path) -> RunRecord:
    raw = json.loads((path / RUN_RECORD).read_text())
    known = RunRecord.__dataclass_fields__
    return RunRecord(**{k: v for k, v in raw.items() if k in known})


def write_record(path: Path, record: RunRecord) -> None:
    """Atomic (tmp + rename) and owner-only: the record names pids, hosts and store URIs."""
    record.updated = time.time()
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".run.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:  # mkstemp creates the file 0600
        f.write(record.to_json())
    os.replace(tmp, path / RUN_RECORD)


def update_record(path: Path, **changes: Any) -> RunRecord:
    """Read-modify-write under a lock: the launcher, the driver and `lmctl stop` all update the record."""
    with open(path / ".run.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = read_record(path)
        for k, v in changes.items():
            setattr(record, k, v)
        write_record(path, record)
    return record


def find_run(root: Path, name: str) -> Path:
    """The run directory of `name`; ConfigError naming the known runs when there is none."""
    path = root / check_name(name)
    if not (path / RUN_RECORD).is_file():
        known = [p.name for p in list_runs(root)]
        hint = f"; runs in {root}: {', '.join(known[-8:])}" if known else f"; {root} has no runs yet"
        raise ConfigError(f"no run named {name!r}{hint}")
    return path


def list_runs(root: Path) -> list[Path]:
    """Run directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / RUN_RECORD).is_file()]
    return sorted(found, key=_created)


def _created(path: Path) -> float:
    try:
        return float(json.loads((path / RUN_RECORD).read_text()).get("created", 0))
    except (OSError, ValueError):
        return 0.0


def driver_alive(record: RunRecord) -> bool:
    return bool(record.driver) and Process(**record.driver).alive()


def never_started(record: RunRecord) -> bool:
    """A dry run that nobody has started since (`lmctl resume` starts it): nothing ran, nothing is stored."""
    return record.dry_run and record.launches == 0 and record.state == "created"


def reap(path: Path, record: RunRecord, state: str = "failed", message: str | None = None) -> list[int]:
    """Clean up after a local run's driver, which must be gone or given up on: kill what is left in its
    session (Ray's agents outlive a killed driver), and a record still claiming an active state takes
    `state` (default failed: the driver died without saying how it ended). Returns the pids killed."""
    killed = kill_session(record.session) if record.session else []
    current = read_record(path)
    if current.state in ACTIVE:
        why = message or f"its driver died without a word; {len(killed)} leftover process(es) killed"
        update_record(path, state=state, message=current.message or why)
    return killed


def effective_state(record: RunRecord) -> str:
    """The record's state, corrected by the truth: an active run whose driver process (on this machine) is
    gone has failed. A cloud run names no driver here: its state is SkyPilot's, as of its last refresh."""
    if record.state in ACTIVE and record.driver and not driver_alive(record):
        return "failed"
    return record.state


def say(msg: str) -> None:
    """One line of a run's own voice in its log (the driver's and the workers')."""
    print(f"[lmctl {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StopRequest:
    """The one stop protocol, local or cloud: the object runs/<name>/STOP in the run's store asks every worker
    to checkpoint and stop at the end of the step it is in. `lmctl stop` and a signalled driver write it; rank
    0 polls it (every step on a file:// store, a stat; every STOP_POLL_S on a remote one, a network call);
    a start clears it."""

    def __init__(self, store: str, name: str):
        from model.store import open_store

        self.store, self.key = open_store(store), store_key(name, STOP)
        poll = os.environ.get("LMCTL_STORE_POLL_S")  # tests: faster
        self.every_s = float(poll or (0.0 if store.startswith("file://") else STOP_POLL_S))
        self._polled, self._asked = float("-inf"), False

    def ask(self) -> None:
        self.store.put_bytes(self.key, b"stop\n")

    def clear(self) -> None:
        if self.store.exists(self.key):
            self.store.delete(self.key)

    def asked(self) -> bool:
        if not self._asked and time.monotonic() - self._polled >= self.every_s:
            self._asked, self._polled = self.store.exists(self.key), time.monotonic()
        return self._asked
