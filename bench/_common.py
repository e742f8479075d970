"""Small helpers the benchmarks share: a plain text table and a results file with the run's context.

Benchmarks print their figures and write the same figures as JSON, so a later run (or another machine) can be
compared with this one; the context (versions, device, load) says how far such a comparison can be trusted.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    """Versions and machine facts that change benchmark figures; the load average shows a busy machine."""
    import torch

    env: dict[str, Any] = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: str | Path, results: dict[str, Any]) -> Path:
    """Write `results` plus the environment to `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **results}, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> None:
    """Print rows as a fixed-width table; cols are (header, key, format spec). Missing values print '-'."""
    cells = [[h for h, _, _ in cols]]
    for row in rows:
        cells.append([format(row[k], f) if row.get(k) is not None else "-" for _, k, f in cols])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    for n, r in enumerate(cells):
        # first column left-aligned (names), numbers right-aligned
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
