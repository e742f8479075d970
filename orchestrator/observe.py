"""Watching runs: `lmctl status`, `logs`, `attach` and `plot` read a run directory and nothing else.

Everything here is derived from files the run writes (run.json, metrics.jsonl, logs/driver.log), so a
viewer can come and go without the run noticing. The state shown is always `runs.effective_state`: a run
whose driver died reads as failed, whatever its record last claimed. No torch, numpy or matplotlib at
import time: `lmctl status` must stay instant (matplotlib is imported inside `plot`).
"""

from __future__ import annotations

import codecs
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from model.errors import ConfigError, make_parent_folder
from model.metrics import read_metrics
from orchestrator import backends, runs
from orchestrator.progress import human

STATE_STYLE = {
    "dry-run": "dim",
    "created": "dim",
    "staging": "cyan",
    "running": "green",
    "stopping": "yellow",
    "finished": "blue",
    "stopped": "yellow",
    "failed": "bold red",
}
LOG_TAIL_LINES = 12
_CHUNK = 1 << 20


def human_duration(seconds: float | None) -> str:
    """12 -> '12s', 200 -> '3m', 7300 -> '2h', 4 days -> '4d': one unit, rounded, to fit a column."""
    if seconds is None:
        return "-"
    s = max(0.0, float(seconds))
    for unit, size, below in (("s", 1, 59.5), ("m", 60, 59.5), ("h", 3600, 23.5)):
        if s < below * size:
            return f"{s / size:.0f}{unit}"
    return f"{s / 86400:.0f}d"


# ---------------------------------------------------------------- facts


def run_metrics(path: Path) -> list[dict[str, Any]]:
    """Complete records of metrics.jsonl; a torn last line (being written) is skipped by read_metrics."""
    return [r for r in read_metrics(path / runs.METRICS) if isinstance(r, dict) and "step" in r]


def _train_config(path: Path) -> dict[str, Any]:
    """The `train` section of config.yaml: fallback for totals an older run.json lacks."""
    try:
        import yaml

        spec = yaml.safe_load((path / runs.CONFIG).read_text()) or {}
    except (OSError, ValueError, ImportError):
        return {}
    train = spec.get("train") if isinstance(spec, dict) else None
    return train if isinstance(train, dict) else {}


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _seconds_per_step(train: list[dict[str, Any]], batch_tokens: int) -> float | None:
    """Median wall time per step over the last few logged intervals; the median ignores a resume gap.
    Falls back to the throughput the loop reported for files that predate the "time" field."""
    timed = [r for r in train[-11:] if isinstance(r.get("time"), (int, float))]
    rates = [
        (b["time"] - a["time"]) / (b["step"] - a["step"])
        for a, b in zip(timed, timed[1:], strict=False)
        if b["step"] > a["step"] and b["time"] >= a["time"]
    ]
    if rates:
        return statistics.median(rates)
    tps = train[-1].get("tokens_per_s") if train else None
    return batch_tokens / tps if tps and batch_tokens else None


def run_summary(path: Path) -> dict[str, Any]:
    """One run's facts for `lmctl status` (JSON-serialisable): record, effective state, latest metrics."""
    path = Path(path)
    record = runs.read_record(path)
    state = runs.effective_state(record)
    metrics = run_metrics(path)
    train = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if "val_loss" in r]
    ckpts = [r for r in metrics if "checkpoint" in r]
    tasks = {
        name: {**score, "step": r["step"]}
        for r in metrics
        if "evals" in r
        for name, score in r["evals"].items()
    }
    sampled = [r for r in metrics if "samples" in r]
    last = train[-1] if train else {}
    cfg = {} if record.steps and record.global_batch_tokens else _train_config(path)
    steps = int(record.steps or cfg.get("steps") or 0)
    batch_tokens = int(record.global_batch_tokens or cfg.get("global_batch_tokens") or 0)
    # steps done: the last logged one, or later where a stop or a checkpoint fell between logging steps
    step = max(
        [int(last.get("step", 0))] + [int(r["step"]) for r in metrics if "stop" in r or "checkpoint" in r]
    )

    times = [r["time"] for r in metrics[-1:] if isinstance(r.get("time"), (int, float))]
    last_sign = max([record.updated, _mtime(path / runs.METRICS), _mtime(path / runs.LOG), *times])
    sps = _seconds_per_step(train, batch_tokens) if state == "running" and steps else None
    eta = None if sps is None else max(0, steps - step) * sps

    return {
        "name": record.name,
        "mode": record.mode,
        "state": state,
        "claimed_state": record.state,
        "preset": record.preset,
        "step": step,
        "steps": steps,
        "loss": last.get("loss"),
        "lr": last.get("lr"),
        "grad_norm": last.get("grad_norm"),
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "val_step": evals[-1]["step"] if evals else None,
        "val_bpb": evals[-1].get("val_bpb") if evals else None,
        "evals": tasks,  # each task's latest score: acc, acc_norm, chance, n, step
        "samples": sampled[-1]["samples"] if sampled else {},
        "tokens_per_s": last.get("tokens_per_s"),
        "tokens_by_source": last.get("tokens_by_source"),  # a mixture's sources: tokens drawn from each
        "staging": _staging(path) if state in runs.ACTIVE else None,  # how far its data's staging is
        "mfu": last.get("mfu"),
        "tokens": last["tokens"] if last.get("step") == step and "tokens" in last else step * batch_tokens,
        "global_batch_tokens": batch_tokens,
        "last_checkpoint": ckpts[-1]["checkpoint"] if ckpts else None,
        "created": record.created,
        "updated": record.updated,
        "age_s": max(0.0, time.time() - last_sign),
        "eta_s": eta,
        "message": record.message,
        "exit_code": record.exit_code,
        "workers": record.workers,
        "store": record.store,
        "checkpoints": record.checkpoints,
        "data": record.data,
        "launches": record.launches,
        "dry_run": runs.never_started(record),
        "path": str(path),
        **backends.of(record).facts(record),  # a cloud run: what it rents
        **_money(path),  # where its time went and what it cost (orchestrator/accounting.py)
    }


def _money(path: Path) -> dict[str, Any]:
    """cost_so_far and `time`: the run's seconds by state, its recoveries, and their price (time measured,
    price assumed: from the plan's table unless --price)."""
    from orchestrator import accounting

    acc = accounting.of_run(path)
    plan = acc.plan or {}
    return {
        "cost_so_far": acc.cost,
        "time": {
            "wall_s": acc.wall_s,
            "by_state": acc.seconds,
            "unaccounted_s": acc.unaccounted_s,
            "recoveries": len(acc.recoveries),
            "redone_steps": acc.redone_steps,
            "lost_s": acc.lost_s,
            "lost_cost": acc.lost_cost,
            "tokens_per_usd": acc.tokens_per_usd,
            "usd_per_btok": acc.usd_per_btok,
            "planned_usd_per_btok": acc.planned_usd_per_btok,
            "cost_basis": acc.cost_basis,
            "price_source": plan.get("price_source"),
        },
    }


def _time_text(t: dict[str, Any]) -> str:
    """'training 71% (1.2 h), recovering 12% (10 min), ...' over the states that took any time."""
    wall = t["wall_s"] or 0.0
    parts = [
        f"{state} {100 * sec / wall:.0f}% ({human_duration(sec)})"
        for state, sec in sorted(t["by_state"].items(), key=lambda kv: -kv[1])
        if sec >= 0.5 and wall > 0
    ]
    return ", ".join(parts) or "-"


def _lost_text(t: dict[str, Any]) -> str:
    """'$1.20 (2 recoveries, 15 steps redone, 31 min)' or '-'."""
    if not t["recoveries"]:
        return "none"
    money = "" if t["lost_cost"] is None else f"${t['lost_cost']:,.2f} "
    return (
        f"{money}({t['recoveries']} recoveries, {t['redone_steps']} steps redone, "
        f"{human_duration(t['lost_s'])})"
    )


def _value_text(t: dict[str, Any]) -> str:
    """'1.2M tokens per $, $0.83 per B tokens (plan: $0.61)': measured time x assumed price."""
    if t["usd_per_btok"] is None:
        return "-"
    plan = t["planned_usd_per_btok"]
    planned = f" (plan: ${plan:,.2f})" if plan is not None else ""
    return f"{human(t['tokens_per_usd'])} tokens per $, ${t['usd_per_btok']:,.2f} per B tokens{planned}"


def _task_text(score: dict[str, Any]) -> str:
    """'acc 0.795, acc_norm 0.790 (chance 0.250, 200 examples, step 60)'"""
    return (
        f"acc {score['acc']:.3f}, acc_norm {score['acc_norm']:.3f} (chance {score['chance']:.3f}, "
        f"{score['n']} examples, step {score['step']})"
    )


def _staging(path: Path) -> dict[str, Any] | None:
    """staging.json of a run that is staging its data (stage.StagingReport), None otherwise."""
    import json

    try:
        facts = json.loads((path / runs.STAGING).read_text())
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) else None


def _staging_text(st: dict[str, Any]) -> str:
    """'tokenizing ./corpus: 1.2K docs, 3.4M tokens, 820.1K tok/s, 41%, eta 2m'"""
    done = [f"{human(st.get('documents') or 0)} docs", f"{human(st.get('tokens') or 0)} tokens"]
    if st.get("tokens_per_s"):
        done.append(f"{human(st['tokens_per_s'])} tok/s")
    if st.get("fraction") is not None:
        done.append(f"{100 * st['fraction']:.0f}%, eta {human_duration(st.get('eta_s'))}")
    return f"{st.get('phase', 'staging')} {st.get('dataset', '')}: {', '.join(done)}"


def checkpoint_list(record: runs.RunRecord) -> list[dict[str, Any]]:
    """The run's loadable checkpoints, oldest first: step, size (bytes), time (of the commit; None for
    checkpoints older than that record) and location. Read from the COMMIT markers in the run's folder or
    store by model.checkpoint, so only committed steps are listed; no torch. StoreError when unreadable."""
    from dataclasses import asdict

    from model.checkpoint import Checkpointer

    return [asdict(c) for c in Checkpointer(record.checkpoints).committed()]


def _gpus_text(s: dict[str, Any]) -> str:
    return f"{s['gpu']} x {s['nodes']} node(s){' spot' if s['spot'] else ''} on {s['cloud']}"


def _billed_text(s: dict[str, Any]) -> str:
    """'2h 0m (SkyPilot's job time)', or the measured time since launch where SkyPilot gave none."""
    seconds = s["job_seconds"] if s["job_seconds"] is not None else s["time"]["wall_s"]
    return f"{human_duration(seconds)} ({s['time']['cost_basis']})"


def _cost_text(s: dict[str, Any]) -> str:
    cost = "-" if s["cost_so_far"] is None else f"${s['cost_so_far']:,.2f}"
    if s["price_per_hour"] is None:
        return cost
    source = s["time"]["price_source"]
    assumed = f" (assumed: {source})" if source and source != "--price" else ""
    return f"{cost} at ${s['price_per_hour']:,.2f}/h{assumed}"


# ---------------------------------------------------------------- status


def _state_text(s: dict[str, Any]):
    """The state column: a dry run never started reads as such, not as a run about to start."""
    from rich.text import Text

    state = "dry-run" if s.get("dry_run") else s["state"]
    return Text(state, style=STATE_STYLE.get(state, ""))


def _num(value: Any, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _step_of(s: dict[str, Any]) -> str:
    return f"{s['step']}/{s['steps']}" if s["steps"] else str(s["step"])


def _rate(s: dict[str, Any]) -> str:
    return "-" if s["tokens_per_s"] is None else human(s["tokens_per_s"])


def _ckpt(s: dict[str, Any]) -> str:
    return "-" if s["last_checkpoint"] is None else str(s["last_checkpoint"])


def status_table(summaries: list[dict[str, Any]]):
    """All runs, one row each, oldest first (the order given)."""
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("name", "mode", "state", "step", "loss", "tok/s", "last ckpt", "age"):
        table.add_column(col, justify="left" if col in ("name", "mode", "state") else "right", no_wrap=True)
    for s in summaries:
        table.add_row(
            s["name"],
            s["mode"],
            _state_text(s),
            _step_of(s),
            _num(s["loss"]),
            _rate(s),
            _ckpt(s),
            human_duration(s["age_s"]),
        )
    return table


def _when(t: float | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _bytes(n: int) -> str:
    return f"{human(n)}B"


def _checkpoints_text(s: dict[str, Any]) -> str:
    """'200 (4.2MB, 2025-11-02 10:01:12), 150 (...)': the loadable ones, newest first."""
    listed = s["committed_checkpoints"]
    if listed is None:
        return "(store not readable: see the warning above)"
    if not listed:
        return "(none committed yet)"
    return ", ".join(f"{c['step']} ({_bytes(c['size'])}, {_when(c['time'])})" for c in reversed(listed))


def checkpoints_table(listed: list[dict[str, Any]]):
    """`lmctl checkpoints <run>`: one row per loadable checkpoint, oldest first."""
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in (("step", "right"), ("size", "right"), ("committed", "left"), ("location", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "location", overflow="fold")
    for c in listed:
        table.add_row(str(c["step"]), _bytes(c["size"]), _when(c["time"]), c["location"])
    return table


def status_detail(summary: dict[str, Any]):
    """Every fact of one run as label/value rows, for `lmctl status <run>`."""
    from rich.table import Table

    s = summary
    state = _state_text(s)
    if s["claimed_state"] != s["state"]:
        state.append(f"  (record says {s['claimed_state']}; its driver is gone)", style="dim")
    if s.get("dry_run"):
        state.append(f"  (rendered by launch --dry-run; lmctl resume {s['name']} starts it)", style="dim")
    mfu = "-" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
    val = "-" if s["val_loss"] is None else f"{s['val_loss']:.3f} (step {s['val_step']})"
    rows = [
        ("name", s["name"]),
        ("state", state),
        ("mode", s["mode"]),
        ("preset", s["preset"]),
        *([("staging", _staging_text(s["staging"]))] if s["staging"] else []),
        ("step", _step_of(s)),
        ("loss", _num(s["loss"])),
        ("val loss", val),
        ("val bpb", _num(s["val_bpb"])),
        *[(f"eval {name}", _task_text(score)) for name, score in s["evals"].items()],
        *[(f"sample {prompt!r}", repr(text)) for prompt, text in s["samples"].items()],
        ("lr", _num(s["lr"], ".2e")),
        ("tokens", human(s["tokens"] or 0)),
        *[(f"  from {name}", human(n)) for name, n in (s["tokens_by_source"] or {}).items()],  # a mixture
        ("tok/s", _rate(s)),
        ("mfu", mfu),
        ("eta", human_duration(s["eta_s"])),
        ("last checkpoint", _ckpt(s)),
        ("workers", str(s["workers"])),
        ("launches", str(s["launches"])),
        ("created", _when(s["created"])),
        ("updated", _when(s["updated"])),
        ("last activity", f"{human_duration(s['age_s'])} ago"),
        ("exit code", "-" if s["exit_code"] is None else str(s["exit_code"])),
        ("message", s["message"] or "-"),
        ("store", s["store"]),
        ("checkpoints", s["checkpoints"]),
        *([("loadable steps", _checkpoints_text(s))] if "committed_checkpoints" in s else []),
        ("data", s["data"] or "-"),
        ("path", s["path"]),
    ]
    if "gpu" in s:
        job = f"{s['job_id']} ({'managed' if s['managed'] else 'cluster ' + str(s['cluster'])})"
        rows[3:3] = [
            ("gpus", _gpus_text(s)),
            ("job", job),
            ("recoveries", str(s["recoveries"] or 0)),
            ("cost so far", f"{_cost_text(s)} over {_billed_text(s)}"),
            ("lost", _lost_text(s["time"])),
            ("value", _value_text(s["time"])),
        ]
    if s["time"]["wall_s"]:
        rows.insert(3, ("time", _time_text(s["time"])))
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    return table


# ---------------------------------------------------------------- logs


def _still_writing(path: Path) -> bool:
    """More output may come: the run is active, or its driver has not exited yet (last words)."""
    try:
        record = runs.read_record(path)
    except (OSError, ValueError):
        return False
    return runs.effective_state(record) in runs.ACTIVE or runs.driver_alive(record)


def print_log(path: Path, follow: bool = False, out: TextIO | None = None, poll_s: float = 0.5) -> None:
    """Print logs/driver.log; with `follow`, keep printing what is appended until the run has ended.

    The state is read *before* each read of the log, so the last read comes after the driver stopped
    and nothing it printed is lost. Bytes are decoded incrementally: a UTF-8 character split across
    two reads is not mangled.
    """
    out = out or sys.stdout
    log = Path(path) / runs.LOG
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset = 0
    while True:
        writing = follow and _still_writing(path)
        offset = _copy_from(log, offset, decoder, out)
        if not writing:
            break
        time.sleep(poll_s)
    out.write(decoder.decode(b"", final=True))
    out.flush()


def _copy_from(log: Path, offset: int, decoder, out: TextIO) -> int:
    """Write the log's bytes from `offset` on; returns the new offset (0 again if the log was replaced)."""
    try:
        f = log.open("rb")
    except OSError:
        return offset  # not created yet
    with f:
        if os.fstat(f.fileno()).st_size < offset:
            offset = 0
        f.seek(offset)
        while chunk := f.read(_CHUNK):
            out.write(decoder.decode(chunk))
            offset += len(chunk)
    out.flush()
    return offset


def _log_tail(path: Path) -> list[str]:
    """The last lines of the log, reading only its end (the log may be large)."""
    try:
        with (path / runs.LOG).open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]


# ---------------------------------------------------------------- attach


def dashboard(path: Path):
    """One frame of `lmctl attach`: state, progress, latest metrics and the end of the log."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    path = Path(path)
    s = run_summary(path)
    head = Text.assemble((s["name"], "bold"), "  ", _state_text(s), f"  {s['mode']}")
    if s["launches"] > 1:
        head.append(f"  launch {s['launches']}", style="dim")

    bar = Table.grid(padding=(0, 2))
    pct = f"{100 * s['step'] / s['steps']:.0f}%" if s["steps"] else ""
    total = s["steps"] or None  # unknown total: a pulsing bar
    done = min(s["step"], s["steps"] or s["step"])
    progress = ProgressBar(total=total, completed=done, width=40, complete_style="green")
    bar.add_row(progress, f"step {_step_of(s)}", pct)

    mfu = "-" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
    facts = Table.grid(padding=(0, 3))
    for _ in range(3):
        facts.add_column(no_wrap=True)
    facts.add_row(
        f"loss {_num(s['loss'])}", f"val loss {_num(s['val_loss'])}", f"val bpb {_num(s['val_bpb'])}"
    )
    facts.add_row(f"tok/s {_rate(s)}", f"mfu {mfu}", f"lr {_num(s['lr'], '.2e')}")
    facts.add_row(
        f"tokens {human(s['tokens'] or 0)}", f"eta {human_duration(s['eta_s'])}", f"last ckpt {_ckpt(s)}"
    )
    facts.add_row(f"active {human_duration(s['age_s'])} ago", "", "")
    for name, score in s["evals"].items():
        facts.add_row(
            f"eval {name}", f"acc {score['acc']:.3f} (chance {score['chance']:.2f})", f"step {score['step']}"
        )

    parts = [head, *([Text(_staging_text(s["staging"]), style="cyan")] if s["staging"] else []), bar, facts]
    if "gpu" in s:
        parts.append(
            Text(
                f"{_gpus_text(s)}  job {s['job_id']}  recoveries {s['recoveries'] or 0}  "
                f"cost so far {_cost_text(s)}"
            )
        )
        parts.append(Text(f"lost {_lost_text(s['time'])}  {_value_text(s['time'])}"))
    if s["message"]:
        parts.append(Text(s["message"], style=STATE_STYLE.get(s["state"], "")))
    if backends.of(runs.read_record(path)).shows_log:
        tail = Text.from_ansi("\n".join(_log_tail(path)) or "(no log yet)", no_wrap=True, overflow="ellipsis")
        parts.append(Panel(tail, title="logs/driver.log", title_align="left", border_style="dim"))
    return Panel(Group(*parts), title=f"lmctl attach {s['name']}", title_align="left")


def attach(
    path: Path, refresh_s: float = 1.0, console=None, refresh=None, refresh_every_s: float = 10.0
) -> str:
    """Live dashboard until the run ends ('ended') or Ctrl-C ('detached'); the run is never touched.
    refresh() (a cloud run: SkyPilot's state, the store's metrics) is called every refresh_every_s.

    On a terminal the frame redraws in place; elsewhere (a pipe, a file, pytest) rich's Live draws
    only the final frame when it stops, so the output stays one readable frame.
    """
    from rich.console import Console
    from rich.live import Live

    path = Path(path)
    console = console or Console()
    refreshed = time.monotonic()
    if refresh:
        refresh()
    if not _still_writing(path):
        console.print(dashboard(path))
        return "ended"
    result = "ended"
    with Live(dashboard(path), console=console, auto_refresh=False, transient=False) as live:
        try:
            while _still_writing(path):
                time.sleep(refresh_s)
                if refresh and time.monotonic() - refreshed >= refresh_every_s:
                    refresh()
                    refreshed = time.monotonic()
                live.update(dashboard(path), refresh=True)
        except KeyboardInterrupt:
            result = "detached"
        live.update(dashboard(path))
    return result


# ---------------------------------------------------------------- plot


def _tokens_per_step(path: Path, train: list[dict[str, Any]]) -> float:
    """run.json, else config.yaml, else what the train records imply: eval records carry no tokens."""
    try:
        gbt = runs.read_record(path).global_batch_tokens
    except (OSError, ValueError, TypeError):
        gbt = 0
    gbt = gbt or _train_config(path).get("global_batch_tokens") or 0
    if not gbt:
        last = next((r for r in reversed(train) if r.get("tokens") and r["step"]), None)
        gbt = last["tokens"] / last["step"] if last else 0
    return float(gbt)


def _tmp_png_beside(out: Path) -> tuple[int, str]:
    """A temporary file in `out`'s folder (created if missing), for an atomic rename onto `out`. A folder at
    `out`, or a folder that cannot be created or written, is one ConfigError line."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: give a file path, e.g. {out / 'loss.png'}")
    make_parent_folder(out)
    try:
        return tempfile.mkstemp(dir=out.parent, prefix=".loss.", suffix=".png.tmp")
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None


def plot(path: Path, out: Path | None = None, logx: bool = False) -> Path:
    """Train and validation loss against tokens seen, and the tasks' accuracy when the run scores any, as a
    PNG (default: <run>/loss.png), written atomically.

    Uses the Agg canvas directly rather than pyplot, so it needs no display and changes no global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    path = Path(path)
    name = path.name
    metrics = run_metrics(path)
    train = [r for r in metrics if r.get("loss") is not None]
    if not train:
        raise ConfigError(f"run {name} has no metrics yet")
    per_step = _tokens_per_step(path, train)
    evals = [r for r in metrics if r.get("val_loss") is not None]
    scored = [r for r in metrics if r.get("evals")]

    fig = Figure(figsize=(8, 8 if scored else 5), dpi=100)
    FigureCanvasAgg(fig)
    ax, *task_ax = fig.subplots(2 if scored else 1, 1, squeeze=False)[:, 0]
    ax.plot(
        [r.get("tokens") or r["step"] * per_step for r in train],
        [r["loss"] for r in train],
        label="train loss",
        linewidth=1.2,
    )
    if evals:
        ax.plot(
            [r["step"] * per_step for r in evals],
            [r["val_loss"] for r in evals],
            "o-",
            label="val loss",
            markersize=4,
        )
    if logx:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human(x)))  # 250.0K, not 250000
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(f"{name}: loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if scored:  # the multiple-choice tasks: accuracy against tokens, chance dashed
        (tax,) = task_ax
        for task in sorted({t for r in scored for t in r["evals"]}):
            points = [(r["step"] * per_step, r["evals"][task]) for r in scored if task in r["evals"]]
            line = tax.plot(
                [x for x, _ in points], [e["acc"] for _, e in points], "o-", label=task, markersize=4
            )
            tax.axhline(points[-1][1]["chance"], linestyle="--", color=line[0].get_color(), alpha=0.5)
        if logx:
            tax.set_xscale("log")
        tax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human(x)))
        tax.set_xlabel("tokens")
        tax.set_ylabel("accuracy (dashed: chance)")
        tax.set_title(f"{name}: tasks")
        tax.grid(True, alpha=0.3)
        tax.legend()
    fig.tight_layout()

    out = Path(out) if out is not None else path / "loss.png"
    fd, tmp = _tmp_png_beside(out)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
