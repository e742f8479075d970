"""Launch, resume and stop runs. Each is one function a notebook could call; the CLI is a thin layer.

launch: validate everything first (nothing is written for bad input), render runs/<name>/, then start the
driver (orchestrator/driver.py) detached in its own session, logging to runs/<name>/logs/driver.log.
resume: start the driver again on the same run directory; the workers continue from the newest
committed checkpoint in the store, with the same data order.
stop: ask the workers to checkpoint and stop (the STOP file), wait, then reap whatever is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from model.config import ConfigError, RunSpec, resolve
from orchestrator import runs
from orchestrator.render import render_config, render_task

MODES = ("local",)


@dataclass
class Launched:
    name: str
    path: Path
    record: runs.RunRecord
    spec: RunSpec


def resolve_spec(preset: str, overrides: list[str], wandb: bool = False) -> RunSpec:
    """Preset + overrides (+ --wandb) -> one validated spec."""
    return resolve(preset, [*overrides, *(["wandb.enabled=true"] if wandb else [])])


def _check_inputs(spec: RunSpec, workers: int, store: str) -> None:
    """Everything that can be checked before writing: batch split, data source, store URI."""
    from model.store import StoreError, open_store

    if not 1 <= workers <= 1024:
        raise ConfigError(f"--workers {workers}: must be between 1 and 1024")
    spec.grad_accum_steps(workers)
    try:
        open_store(store)
    except (StoreError, ValueError) as e:
        raise ConfigError(f"--store {store!r}: {e}") from None
    if spec.data.path:
        from model.staged import staged_manifest

        try:
            staged_manifest(spec.data.path)
        except (StoreError, ValueError) as e:
            raise ConfigError(f"data.path {spec.data.path!r}: {e}") from None
    elif _looks_local(spec.data.dataset) and not Path(spec.data.dataset).exists():
        raise ConfigError(
            f"data.dataset {spec.data.dataset!r}: no such file or folder (give a local path or a hub id "
            "org/name)"
        )


def _looks_local(dataset: str) -> bool:
    local_suffixes = (".jsonl", ".json", ".txt", ".parquet", ".gz")
    return dataset.startswith((".", "/", "~")) or Path(dataset).suffix in local_suffixes


def launch(
    preset: str,
    overrides: list[str] | None = None,
    *,
    name: str | None = None,
    mode: str = "local",
    workers: int = 2,
    store: str | None = None,
    wandb: bool = False,
    dry_run: bool = False,
    root: Path | None = None,
) -> Launched:
    """Render runs/<name>/ and (unless dry_run) start its driver detached. Raises ConfigError, writing
    nothing, for any bad input."""
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    spec = resolve_spec(preset, overrides or [], wandb)
    root = runs.runs_root(root)
    name = runs.check_name(name) if name is not None else runs.generate_name(preset)
    store = (store or runs.default_store(root)).rstrip("/")
    _check_inputs(spec, workers, store)
    path = root / name
    exists = ConfigError(f"run {name!r} already exists in {root}: `lmctl resume {name}` continues it")
    if path.exists():
        raise exists
    root.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()  # atomic: of two launches racing for one name, one wins
    except FileExistsError:
        raise exists from None
    try:
        os.chmod(path, 0o700)  # run state stays the owner's
        (path / "logs").mkdir()
        (path / runs.CONFIG).write_text(render_config(spec))
        (path / runs.TASK).write_text(render_task(name, store, workers))
        now = time.time()
        record = runs.RunRecord(
            name=name,
            mode=mode,
            state="created",
            preset=preset,
            created=now,
            updated=now,
            store=store,
            checkpoints=f"{store}/runs/{name}/checkpoints",
            data=spec.data.path,
            workers=workers,
            steps=spec.train.steps,
            global_batch_tokens=spec.train.global_batch_tokens,
        )
        runs.write_record(path, record)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # nothing half-written
        raise
    if not dry_run:
        record = start_driver(path)
    return Launched(name, path, record, spec)


def start_driver(path: Path) -> runs.RunRecord:
    """Start `python -m orchestrator.driver` detached: its own session, so it outlives this command and
    every process of the run can be found (and reaped) by session id."""
    record = runs.read_record(path)
    runs.update_record(path, launches=record.launches + 1, exit_code=None, message=None)
    with open(path / runs.LOG, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.driver", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
    # One write, so the record never claims an active state without naming a live driver. The driver's own
    # first write (pid, session) says the same; it reaches "running" only seconds later.
    driver = runs.Process.of(proc.pid).__dict__
    return runs.update_record(path, state="staging", driver=driver, session=proc.pid)


def resume(name: str, root: Path | None = None) -> runs.RunRecord:
    """Start a stopped, failed or dry-run run again; it continues from its newest committed checkpoint."""
    path = runs.find_run(runs.runs_root(root), name)
    record = runs.read_record(path)
    state = runs.effective_state(record)
    if state in runs.ACTIVE:
        raise ConfigError(
            f"run {name!r} is {state}: `lmctl attach {name}` follows it, `lmctl stop {name}` stops it"
        )
    if state == "finished":
        raise ConfigError(f"run {name!r} has finished all {record.steps} steps; there is nothing to resume")
    if record.session:
        runs.kill_session(record.session)  # leftovers of a crashed driver (Ray agents) must not pile up
    return start_driver(path)


def stop(name: str, root: Path | None = None, timeout: float = 120.0) -> runs.RunRecord:
    """Checkpoint and stop a running run, then make sure none of its processes is left."""
    path = runs.find_run(runs.runs_root(root), name)
    record = runs.read_record(path)
    if runs.driver_alive(record):
        (path / runs.STOP).touch()
        runs.update_record(path, state="stopping")
        deadline = time.monotonic() + timeout
        while runs.driver_alive(record) and time.monotonic() < deadline:
            time.sleep(0.2)
        if runs.driver_alive(record):  # killed just below, with the rest of its session
            message = f"not stopped after {timeout:.0f} s, killed; resume continues from its last checkpoint"
            runs.update_record(path, state="stopped", message=message)
    if record.session:
        runs.kill_session(record.session)  # a driver past its timeout, or Ray's agents it could not reap
    record = runs.read_record(path)
    if record.state in runs.ACTIVE:  # the driver died without saying how it ended
        record = runs.update_record(path, state="stopped", message=record.message or "stopped by lmctl stop")
    return record
