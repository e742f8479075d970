"""What each Ray Train worker runs: the plain training loop, told when to stop, reporting sparingly.

Kept apart from the driver with few imports: Ray imports this module in every worker and in its
controller (it unpickles train_worker by reference), so every import here is paid per process.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.runs import LOG, STOP


def say(msg: str) -> None:
    print(f"[lmctl {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_worker(cfg: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: the plain training loop, told when to stop and reporting sparingly."""
    import ray.train

    from model.config import RunSpec
    from model.train import train

    # Ray Train logs a line per report() call; the run's log has the metrics already.
    logging.getLogger("ray.train.v2._internal.execution.context").addFilter(
        lambda r: not r.getMessage().startswith("Reporting training result")
    )
    path = Path(cfg["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    _log_to(path / (LOG if rank == 0 else f"logs/worker-{rank}.log"))
    (path / "logs" / f"worker-{rank}.pid").write_text(str(os.getpid()))
    if rank == 0:
        say(f"{ray.train.get_context().get_world_size()} workers started")
    spec = RunSpec.model_validate(cfg["spec"])
    stop_file = path / STOP

    def on_log(rec: dict) -> None:
        if "val_loss" in rec:  # report() is a barrier across workers: only at evaluations
            ray.train.report({k: v for k, v in rec.items() if v is not None})

    train(
        spec,
        path,
        device=cfg["device"],
        should_stop=stop_file.exists,
        on_log=on_log,
        checkpoint_root=cfg["checkpoints"],
    )


def _log_to(path: Path) -> None:
    """Send this process's stdout and stderr to `path` (O_APPEND: lines from the driver interleave whole)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
