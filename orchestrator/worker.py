"""What each Ray Train worker runs: the plain training loop, told when to stop, reporting sparingly.

Kept apart from the driver with few imports: Ray imports this module in every worker and in its
controller (it unpickles train_worker by reference), so every import here is paid per process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from model.timeline import TIMELINE
from orchestrator.runs import LOG, METRICS, StopRequest, runs_root, say, store_key

METRICS_PUSH_S = 30.0  # a cloud run's metrics.jsonl reaches the store at most this stale (and at each eval)


def train_worker(cfg: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: the plain training loop, told when to stop and reporting sparingly."""
    import ray.train
    import ray.train.torch

    from model.train import train

    os.umask(0o077)  # on a pod, Ray (started by the task's script) did not get it from our driver

    quiet_report_lines()
    on_pod = cfg["pod"]
    # Nodes share no disk: on a pod each node's run folder is its own (runs_root(), as the task script sets
    # it on every node), never the head's path, which need not exist here.
    path = runs_root() / cfg["name"] if on_pod else Path(cfg["run_dir"])
    (path / "logs").mkdir(parents=True, exist_ok=True)
    rank = ray.train.get_context().get_world_rank()
    if not on_pod:  # locally the workers write the run's log; on a pod Ray forwards it to SkyPilot's log
        _log_to(path / (LOG if rank == 0 else f"logs/worker-{rank}.log"))
    (path / "logs" / f"worker-{rank}.pid").write_text(str(os.getpid()))
    if rank == 0:
        say(f"{ray.train.get_context().get_world_size()} workers started")
    mirror = StoreMirror(cfg["store"], path.name, path / METRICS) if on_pod and rank == 0 else None
    if mirror:
        mirror.pull()  # rank 0 may land on any node, after a recovery on a new one: the history comes along
    stop = StopRequest(cfg["store"], path.name) if rank == 0 else None  # train() tells the other ranks

    def should_stop() -> bool:
        return stop is not None and stop.asked()

    def on_log(rec: dict) -> None:
        if mirror:  # an evaluation or a stop request reaches `lmctl status` and `lmctl stop` at once
            mirror.push_metrics(now="val_loss" in rec or "stop" in rec)
        if "val_loss" in rec:  # report() is a barrier across workers: only at evaluations
            ray.train.report({k: v for k, v in rec.items() if v is not None})

    # A GPU worker trains on the device Ray assigned to it, which need not be cuda:LOCAL_RANK
    device = str(ray.train.torch.get_device()) if cfg["device"] == "cuda" else cfg["device"]
    try:
        train(
            cfg["spec"],
            path,
            device=device,
            should_stop=should_stop,
            on_log=on_log,
            checkpoints=cfg["checkpoints"],
            launch=cfg.get("launch"),
        )
    except BaseException:
        if mirror:  # the last metrics, if the store takes them; the training error is what must surface
            with contextlib.suppress(Exception):
                mirror.push_metrics(now=True)
        raise
    if mirror:
        mirror.push_metrics(now=True)


def quiet_report_lines() -> None:
    """Ray Train logs `Reporting training result N: TrainingReport(...)` at INFO for every report() call, and
    the run's log has those metrics already. Its logger is named after the file (getLogger(__file__)), not
    the module, so it is reached through the module; WARNING and above still get through."""
    from ray.train.v2._internal.execution import context

    context.logger.setLevel(logging.WARNING)


class StoreMirror:
    """Rank 0 of a cloud run: metrics.jsonl copied to the store (where `lmctl status` reads it), throttled:
    it is a network call.

    Transient faults (503s, resets, slow or cut replies, a torn upload) are retried by the store
    (model/store.py: botocore's retries, then put_file's verification and re-send). A push or poll that
    still fails raises StoreError out of the step that called it: the run stops loudly, with the error
    in its log, and resumes from its last checkpoint where recovery is on. It is not swallowed: a run
    whose store is gone cannot checkpoint either, and `lmctl status` must not show a stale run as live.
    A failed push leaves the store's metrics.jsonl as it was or a prefix of the local file (append-only),
    never anything else (tests/chaos_storage.py metric_writes).
    """

    def __init__(self, store: str, name: str, metrics: Path):
        from model.store import open_store

        self.store, self.name, self.metrics = open_store(store), name, metrics
        self.every_s = float(os.environ.get("LMCTL_STORE_POLL_S") or METRICS_PUSH_S)  # tests: faster
        self._pushed = float("-inf")

    def pull(self) -> None:
        """The run's metrics.jsonl and timeline.jsonl from the store, where this node has none: the loop then
        cuts metrics back to the step it resumes from and appends to both, so one history (and every
        launch's time) survives whichever node rank 0 is on."""
        for local in self._files():
            key = store_key(self.name, local.name)
            if not local.exists() and self.store.exists(key):
                self.store.get_file(key, local)

    def push_metrics(self, now: bool = False) -> None:
        if now or time.monotonic() - self._pushed >= self.every_s:
            for local in self._files():
                if local.exists():
                    self.store.put_file(local, store_key(self.name, local.name))
            self._pushed = time.monotonic()

    def _files(self) -> list[Path]:
        return [self.metrics, self.metrics.with_name(TIMELINE)]


def _log_to(path: Path) -> None:
    """Send this process's stdout and stderr to `path` (O_APPEND: lines from the driver interleave whole)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
