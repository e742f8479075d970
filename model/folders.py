"""A folder replaced by renames only: written into a hidden sibling, renamed into place, a previous one
renamed aside first and removed last, so a crash at any instant leaves the old or the new folder whole.
Exports (model/export_hf.py) and run reports (orchestrator/report.py) are written this way. No torch."""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

from model.faults import fault_point


def new_sibling(out: Path, kind: str) -> Path:
    """A fresh hidden name next to `out` (same filesystem, so renames between them are atomic)."""
    return out.parent / f".{out.name}.{kind}-{uuid.uuid4().hex[:8]}"


def clear_leftovers(out: Path) -> None:
    """Hidden siblings that a writer of `out` killed half-way left (new_sibling's names, nothing else)."""
    ours = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    for p in out.parent.iterdir():
        if ours.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def move_into_place(tmp: Path, out: Path, fault: str | None = None) -> None:
    """`tmp` becomes `out` by renames only. A folder already there is renamed aside first (and put back if the
    second rename fails) and removed last. `fault` names the fault point hit between the steps (tests)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        tmp.rename(out)  # a new path, or an empty folder (rename replaces an empty folder, never a full one)
        return
    old = new_sibling(out, "old")
    out.rename(old)
    if fault:
        fault_point(fault)  # 1: the old folder aside, the new one not in yet
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # the previous folder goes back where it was
        raise
    if fault:
        fault_point(fault)  # 2: the new folder in, the old one not removed yet
    shutil.rmtree(old)
