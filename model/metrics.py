"""Metrics sink of the training loop: metrics.jsonl (one JSON object a line), the console, wandb.

Only rank 0 writes. On resume the file is cut back to the resumed step, so it always reads as one
uninterrupted history even when steps after the last checkpoint were redone.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.config import RunSpec


def truncate_after(path: Path, step: int) -> None:
    """Drop lines whose step is beyond `step` (redone after a crash); atomic rewrite."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def append_record(path: str | Path, rec: dict[str, Any]) -> None:
    """One record at the end of a metrics.jsonl, as one write (a line the trainer writes stays whole)."""
    with open(path, "a") as f:
        f.write(json.dumps({**rec, "time": round(time.time(), 3)}) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics.jsonl (or any JSON-lines file: timeline.jsonl)."""
    out = []
    p = Path(path)
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _console_line(rec: dict[str, Any]) -> str:
    if "checkpoint" in rec:
        took = f" ({rec['checkpoint_s']:.1f} s)" if rec.get("checkpoint_s") is not None else ""
        return f"step {rec['step']:>6} | checkpoint committed{took}"
    if "stop" in rec:
        return f"step {rec['step']:>6} | stop requested: checkpointing this step"
    if "val_loss" in rec:
        bpb = f" | bpb {rec['val_bpb']:.4f}" if rec.get("val_bpb") is not None else ""
        return f"step {rec['step']:>6} | val_loss {rec['val_loss']:.4f} | ppl {rec['val_ppl']:.2f}{bpb}"
    if "evals" in rec:
        return "\n".join(
            f"step {rec['step']:>6} | eval {name}: acc {r['acc']:.3f}, acc_norm {r['acc_norm']:.3f} "
            f"(chance {r['chance']:.3f}, {r['n']} examples)"
            for name, r in rec["evals"].items()
        )
    if "samples" in rec:
        return "\n".join(f"step {rec['step']:>6} | sample {p!r} -> {t!r}" for p, t in rec["samples"].items())
    parts = [
        f"step {rec['step']:>6}",
        f"loss {rec['loss']:.4f}",
        f"lr {rec['lr']:.2e}",
        f"gnorm {rec['grad_norm']:.3f}",
        f"{rec['tokens_per_s']:,.0f} tok/s",
    ]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, run_dir: Path, spec: RunSpec, run_id: str, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self._lock = threading.Lock()  # checkpoint commits are logged from the checkpoint writer thread
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step)
        self._file = self.path.open("a")
        if spec.wandb.enabled:
            self._wandb = _start_wandb(spec, run_dir, run_id)

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        rec["time"] = round(time.time(), 3)
        with self._lock:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
            print(_console_line(rec), flush=True)
        if self._wandb is not None and "checkpoint" not in rec and "stop" not in rec:
            self._wandb.log(
                {k: v for k, v in rec.items() if v is not None and k not in ("step", "time")},
                step=rec["step"],
            )

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(spec: RunSpec, run_dir: Path, run_id: str):
    """wandb run with a stable id, so a resumed run continues the same chart; offline without a key."""
    import wandb

    mode = spec.wandb.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(
        project=spec.wandb.project,
        entity=spec.wandb.entity,
        name=run_id,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        config=spec.model_dump(mode="json"),
    )
