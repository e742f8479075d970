"""Warnings about runs that are allowed but rarely meant. They never stop anything.

- A local run that would take days on this machine (the 1b preset on a laptop): an estimate, and what to
  try instead. Said by `launch`, before anything starts.
- A run that sees its data more than once: how many passes. Said where the staged token count becomes
  known: by the driver for a local run (its log), by `launch` for a cloud run (it stages from here).

Warnings go to stderr: the run's log in the driver, never the --json output of a command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

from model.config import RunSpec, human
from model.hardware import DEFAULT_MFU, cpu_cores, cpu_peak_flops, peak_flops
from orchestrator.plan import human_time, tokens_per_s

if TYPE_CHECKING:
    from model.shards import Manifest

LOCAL_WARN_HOURS = 24.0  # a local run estimated to take longer than this is warned about
EPOCHS_WARN = 1.05  # more passes than this over the staged train tokens are warned about (not a rounding)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def warn_before_launch(spec: RunSpec, preset: str, mode: str, workers: int) -> None:
    """What `launch` says before it starts a run (nothing for a cloud run: its plan says how long)."""
    if mode != "local":
        return
    hardware = local_hardware(workers)
    if hardware and (message := slow_local_run(spec, preset, *hardware)):
        warn(message)


def warn_epochs(spec: RunSpec, manifest: Manifest) -> None:
    if message := epochs_seen(spec, manifest):
        warn(message)


def slow_local_run(spec: RunSpec, preset: str, where: str, peak: float) -> str | None:
    """The warning for a run that would take more than LOCAL_WARN_HOURS on hardware of `peak` FLOP/s (at
    the MFU `lmctl plan` assumes), with a number of steps that takes about an hour there."""
    t = spec.train
    tok_s = tokens_per_s(spec.model, peak)
    hours = t.steps * t.global_batch_tokens / tok_s / 3600
    if hours <= LOCAL_WARN_HOURS:
        return None
    an_hour = int(3600 * tok_s / t.global_batch_tokens)
    instead = (
        f"--override train.steps={an_hour} (about an hour here)"
        if an_hour >= 1
        else f"--config tiny (one step of {preset} alone takes about {human_time(hours / t.steps)} here)"
    )
    return (
        f"{preset} for {t.steps} steps on {where}: about {human_time(hours)} ({human(tok_s)} tokens/s at "
        f"{DEFAULT_MFU:.0%} of a rough {peak / 1e12:,.1f} TFLOP/s); try {instead}"
    )


def epochs_seen(spec: RunSpec, manifest: Manifest) -> str | None:
    """The warning for a run whose tokens are more than EPOCHS_WARN passes over the staged train tokens."""
    run_tokens = spec.train.steps * spec.train.global_batch_tokens
    epochs = run_tokens / max(manifest.train_tokens, 1)
    if epochs <= EPOCHS_WARN:
        return None
    return (
        f"{epochs:.1f} epochs: the run's {human(run_tokens)} tokens are {epochs:.1f} passes over the "
        f"{human(manifest.train_tokens)} staged train tokens (stage more data, or lower train.steps)"
    )


def local_hardware(workers: int) -> tuple[str, float] | None:
    """Where a local run trains, and its peak FLOP/s: the GPUs when there is one per worker (the driver then
    trains on them), else the CPU cores. None for GPUs whose peak model/hardware.py does not know."""
    gpus = local_gpu_names()
    if gpus and len(gpus) >= workers:
        peaks = [peak_flops(name) for name in gpus[:workers]]
        return None if None in peaks else (f"{workers} x {gpus[0]}", sum(peaks))
    cores = cpu_cores()
    return f"this CPU ({cores} cores)", cpu_peak_flops(cores)


def local_gpu_names() -> list[str]:
    """The GPUs nvidia-smi lists, no more than CUDA_VISIBLE_DEVICES lets through; none without nvidia-smi
    (asked instead of torch, which `launch` does not import)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        names = names[: len([v for v in visible.split(",") if v.strip()])]
    return names
