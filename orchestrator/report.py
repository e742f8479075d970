"""`lmctl report <run>`: a self-contained folder of what a run did and what it cost.

    report.md    the run, the plan beside what happened, time and money by state, recoveries, evaluations
    loss.png     train and val loss against tokens; the tasks' accuracy (observe.plot draws it)
    speed.png    tokens/s and MFU against wall time, recoveries shaded
    cost.png     cumulative $ by state against wall time, recoveries marked, the plan's line beside it
    report.json  Accounting.to_dict() and the file names, for scripts

Time comes from the run's own clocks (run.json's segments, timeline.jsonl, metrics.jsonl): measured. Money is
that time x a price from a table or --price: assumed, and every $ figure says so. A run without a price (a
local one) is reported in hours, never in $. The folder is written beside its destination and renamed onto
it, so a crash never leaves half a report; a folder holding anything a report did not write is refused.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import ConfigError, make_parent_folder
from model.folders import clear_leftovers, move_into_place, new_sibling
from model.timeline import LOOP_STATES
from orchestrator import accounting, observe, runs
from orchestrator.accounting import STATES, Accounting
from orchestrator.progress import human

REPORT = "report"  # the default folder, inside the run's
FILES = ("report.md", "report.json", "loss.png", "speed.png", "cost.png")
STATE_COLOURS = {  # fixed, so two reports read alike
    "staging": "#17becf",
    "setup": "#8c8c8c",
    "training": "#2ca02c",
    "evaluating": "#1f77b4",
    "checkpointing": "#9467bd",
    "recovering": "#d62728",
    "idle": "#bcbd22",
    "unaccounted": "#e0e0e0",
}
RECOVERY_COLOUR = "#d62728"
UNTIMED = "not recorded: run.json has no segments (a run from before time accounting)"


@dataclass
class _Run:
    """Everything a report reads, gathered once."""

    path: Path
    record: runs.RunRecord
    state: str
    acc: Accounting
    metrics: list[dict[str, Any]]
    train: list[dict[str, Any]]  # records with a loss
    t0: float  # unix time of the first segment's start: the pictures' zero
    now: float

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def plan(self) -> dict[str, Any]:
        return self.acc.plan or {}

    @property
    def priced(self) -> bool:
        return self.acc.price_per_hour is not None

    @property
    def tokens(self) -> int:
        """Tokens trained: the timeline's last step heard, else the metrics' (a run older than timelines)."""
        return self.acc.tokens or int(self.train[-1].get("tokens") or 0)

    @property
    def timed(self) -> bool:
        """run.json kept its segments (runs launched before time accounting did not): wall time is known."""
        return bool(self.record.segments)

    @property
    def wall_s(self) -> float | None:
        return self.acc.wall_s if self.timed else None

    @property
    def clocked(self) -> bool:
        """timeline.jsonl heard a launch's loop: recoveries and lost time are known (none is not unknown)."""
        return any(state in LOOP_STATES for _, _, state in self.acc.spans)

    @property
    def price_source(self) -> str:
        return str(self.plan.get("price_source") or "the plan's price")


def write_report(path: Path, out: Path | None = None) -> Path:
    """Write the report folder of the run in `path` (default <run>/report/) and return it. ConfigError (one
    line) for a run with no metrics yet or an `out` that holds files a report did not write."""
    run = _gather(Path(path))
    out = Path(out) if out is not None else run.path / REPORT
    _check_replaceable(out)
    tmp = _temp_sibling(out)
    try:
        _write_into(run, tmp)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    clear_leftovers(out)  # what a killed report left beside it
    return out


def report_json(out: Path) -> dict[str, Any]:
    """The report.json of a written report folder."""
    return json.loads((out / "report.json").read_text())


# ---------------------------------------------------------------- gathering


def _gather(path: Path) -> _Run:
    record = runs.read_record(path)
    metrics = observe.run_metrics(path)
    train = [r for r in metrics if r.get("loss") is not None]
    if not train:
        raise ConfigError(
            f"run {record.name} has no metrics yet: nothing to report (lmctl status {record.name})"
        )
    now = time.time()
    acc = accounting.of_run(path, now)
    return _Run(
        path, record, runs.effective_state(record), acc, metrics, train, _origin(record, metrics), now
    )


def _origin(record: runs.RunRecord, metrics: list[dict[str, Any]]) -> float:
    """When the run began renting: its first segment; a run older than segments, its first metric."""
    if record.segments and record.segments[0][0] is not None:
        return float(record.segments[0][0])
    times = [r["time"] for r in metrics if isinstance(r.get("time"), (int, float))]
    return min(times, default=record.created)


def _gpu_count(run: _Run) -> int | None:
    """The run's GPUs (the plan's world, else --gpu's count x nodes); None for a local run."""
    if run.plan.get("world"):
        return int(run.plan["world"])
    if not run.record.gpu:
        return None
    from orchestrator.gpus import parse_gpu

    try:
        return parse_gpu(run.record.gpu).count * run.record.nodes
    except ConfigError:
        return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _median(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if _is_number(v)]
    return statistics.median(numbers) if numbers else None


# ---------------------------------------------------------------- the folder


def _check_replaceable(out: Path) -> None:
    """A report replaces a report, never anything else."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file: give --out a folder, e.g. {out.parent / REPORT}")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        if foreign:
            raise ConfigError(
                f"{out} holds files a report did not write ({', '.join(foreign[:3])}): "
                "give --out a new or empty folder"
            )


def _temp_sibling(out: Path) -> Path:
    make_parent_folder(out)
    tmp = new_sibling(out, "tmp")
    try:
        tmp.mkdir()
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
    return tmp


def _write_into(run: _Run, folder: Path) -> None:
    observe.plot(run.path, folder / "loss.png")
    _speed_png(run, folder / "speed.png")
    _cost_png(run, folder / "cost.png")
    (folder / "report.md").write_text(_markdown(run))
    facts = {"run": run.name, "files": list(FILES), **run.acc.to_dict()}
    (folder / "report.json").write_text(json.dumps(facts, indent=1) + "\n")


# ---------------------------------------------------------------- formatting


def _usd(x: float | None) -> str:
    return "-" if x is None else f"-${-x:,.2f}" if x < 0 else f"${x:,.2f}"


def _hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:,.2f} h"


def _num(x: Any, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- report.md


def _markdown(run: _Run) -> str:
    sections = [
        f"# Run report: {run.name}",
        f"Written {_clock(run.now)} by `lmctl report`. *Measured*: from the run's clocks and logs. "
        "*Assumed*: a price table, a flag or a default the plan took. *Planned*: the plan's estimate before "
        "the run, made from those assumptions.",
        *_run_section(run),
        *_plan_section(run),
        *_states_section(run),
        *_recoveries_section(run),
        *_evals_section(run),
        "## Pictures",
        "![loss and evaluations against tokens](loss.png)",
        "![tokens/s and MFU over wall time](speed.png)",
        f"![{'cost' if run.priced else 'hours'} by state over wall time](cost.png)",
    ]
    return "\n\n".join(sections) + "\n"


def _run_section(run: _Run) -> list[str]:
    r, acc = run.record, run.acc
    if r.mode == "local":
        where = f"this machine, {r.workers} worker(s)"
    else:
        where = f"{r.gpu or '-'} x {r.nodes} node(s){', spot' if r.spot else ''}, cloud {r.cloud or 'any'}"
    steps = f"{_num(acc.step or run.train[-1]['step'])} / {_num(r.steps)}" if r.steps else _num(acc.step)
    price = (
        f"{_usd(acc.price_per_hour)}/h for all the run's GPUs (assumed: {run.price_source})"
        if run.priced
        else "none: a run without a price is reported in hours"
    )
    rows = [
        ["mode", r.mode],
        ["hardware", where],
        ["state", run.state + (" (still running: figures so far)" if acc.live else "")],
        ["steps", steps],
        ["tokens trained", f"{human(run.tokens)} (measured)"],
        ["launches", str(r.launches)],
        ["began", _clock(run.t0)],
        ["wall time", f"{_hours(run.wall_s)} (measured)" if run.timed else UNTIMED],
        ["price", price],
    ]
    return ["## The run", _table(["", ""], rows)]


@dataclass
class _Row:
    figure: str
    planned: str
    happened: str
    which: str  # "planned: ...; happened: ..."


def _plan_section(run: _Run) -> list[str]:
    rows = _plan_rows(run)
    table = _table(
        ["figure", "planned", "happened", "which"],
        [[r.figure, r.planned, r.happened, r.which] for r in rows],
    )
    out = ["## Plan beside what happened", table]
    assumed = run.plan.get("assumed") or []
    if assumed:
        out.append("The plan assumed: " + "; ".join(str(a) for a in assumed) + ".")
    if not run.plan:
        out.append("No plan was recorded (a local run, or one launched before plans were kept): '-' above.")
    return out


def _plan_rows(run: _Run) -> list[_Row]:
    money = _money_rows(run) if run.priced or run.plan.get("cost") is not None else []
    return [*_progress_rows(run), *_interruption_rows(run), *_checkpoint_rows(run), *money]


def _progress_rows(run: _Run) -> list[_Row]:
    p = run.plan
    tps = _median([r.get("tokens_per_s") for r in run.train])
    mfu = _median([r.get("mfu") for r in run.train])
    return [
        _Row(
            "tokens", _num(p.get("token_budget")), _num(run.tokens), "planned: the budget; happened: measured"
        ),
        _Row(
            "hours",
            _planned_hours(run),
            _hours(run.wall_s),
            "planned: estimate; happened: measured (host clocks)",
        ),
        _Row(
            "tokens/s",
            _num(p.get("tokens_per_s")),
            _num(tps),
            "planned: estimate; happened: measured (median step)",
        ),
        _Row("MFU", _pct(p.get("mfu")), _pct(mfu), "planned: assumed; happened: measured (median step)"),
    ]


def _interruption_rows(run: _Run) -> list[_Row]:
    """Interruptions, lost time and recovery seconds: '-' where no timeline says what happened."""
    p, acc, known = run.plan, run.acc, run.clocked
    auto, by_hand = (sum(r.automatic == a for r in acc.recoveries) for a in (True, False))
    count = f"{len(acc.recoveries)} ({auto} recovered automatically, {by_hand} by lmctl resume)"
    planned_lost = p.get("expected_lost_hours")
    return [
        _Row(
            "interruptions",
            _num(p.get("expected_preemptions"), ".2g"),
            count if known else "-",
            "planned: estimate (assumed rate); happened: measured",
        ),
        _Row(
            "lost hours",
            _hours(None if planned_lost is None else planned_lost * 3600),
            _hours(acc.lost_s if known else None),
            "planned: estimate; happened: measured (recovery + redone steps)",
        ),
        _Row(
            "seconds to recover from a preemption",
            _num(p.get("recovery_s")),
            _num(_median([r.recovery_s for r in acc.recoveries if r.automatic])),
            "planned: assumed; happened: measured (median of the automatic ones)",
        ),
    ]


def _planned_hours(run: _Run) -> str:
    """The plan's hours, and its hours for the tokens trained when the run trained fewer."""
    hours, budget = run.plan.get("hours"), run.plan.get("token_budget")
    if hours is None:
        return "-"
    text = f"{hours:,.2f} h"
    if budget and run.tokens < 0.99 * budget:
        text += f" ({hours * run.tokens / budget:,.2f} h for the tokens trained)"
    return text


def _checkpoint_rows(run: _Run) -> list[_Row]:
    ckpts = [r for r in run.metrics if "checkpoint" in r]
    gaps = [
        (b["step"] - a["step"], b.get("time"), a.get("time")) for a, b in zip(ckpts, ckpts[1:], strict=False)
    ]
    every = _median([steps for steps, _, _ in gaps])
    every_s = _median([tb - ta for _, tb, ta in gaps if _is_number(tb) and _is_number(ta)])
    planned_every = run.plan.get("checkpoint_every")
    planned_s = run.plan.get("checkpoint_interval_s")
    return [
        _Row(
            "checkpoint every",
            "-" if planned_every is None else f"{planned_every:,} steps ({_num(planned_s)} s)",
            "-" if every is None else f"{every:,.0f} steps ({_num(every_s)} s)",
            "planned: chosen for the assumed failure rate; happened: measured (median)",
        ),
        _Row(
            "seconds per checkpoint",
            _num(run.plan.get("checkpoint_cost_s"), ",.1f"),
            _num(_median([r.get("checkpoint_s") for r in ckpts]), ",.1f"),
            "planned: assumed; happened: measured (median)",
        ),
    ]


def _money_rows(run: _Run) -> list[_Row]:
    p, acc = run.plan, run.acc
    money = "planned: estimate at an assumed price; happened: time measured x price assumed"
    total = f"planned: estimate at an assumed price; happened: {acc.cost_basis} x price assumed"
    known = run.timed or acc.billed_s is not None
    per_hour = (
        None if p.get("price_per_gpu_hour") is None else p["price_per_gpu_hour"] * (_gpu_count(run) or 1)
    )
    return [
        _Row("$ per hour", _usd(per_hour), _usd(acc.price_per_hour), f"both assumed ({run.price_source})"),
        _Row("$ total", _planned_cost(run), _usd(acc.cost if known else None), total),
        _Row("$ per B tokens", _usd(p.get("usd_per_btok")), _usd(acc.usd_per_btok if known else None), total),
        _Row(
            "lost $", _usd(p.get("expected_lost_cost")), _usd(acc.lost_cost if run.clocked else None), money
        ),
    ]


def _planned_cost(run: _Run) -> str:
    cost, budget = run.plan.get("cost"), run.plan.get("token_budget")
    if cost is None:
        return "-"
    text = _usd(cost)
    if budget and run.tokens < 0.99 * budget:
        text += f" ({_usd(cost * run.tokens / budget)} for the tokens trained)"
    return text


def _states_section(run: _Run) -> list[str]:
    if not run.timed:
        return ["## Time by state", f"Time {UNTIMED}."]
    acc = run.acc
    wall = acc.wall_s or 1.0
    amount = "$ (time measured x price assumed)" if run.priced else "hours (measured)"
    rows = [
        [s, _num(acc.seconds[s]), _pct(acc.seconds[s] / wall), _amount(run, acc.seconds[s])] for s in STATES
    ]
    rows.append(
        [
            "unaccounted",
            _num(acc.unaccounted_s),
            _pct(acc.unaccounted_s / wall),
            _amount(run, acc.unaccounted_s),
        ]
    )
    rows.append(["**wall**", _num(acc.wall_s), "100.0%", _amount(run, acc.wall_s)])
    lead = (
        f"Time is measured (host clocks); money is that time x {_usd(acc.price_per_hour)}/h, assumed "
        f"({run.price_source})."
        if run.priced
        else "Time is measured (host clocks); the run has no price, so no money is shown."
    )
    note = (
        "Unaccounted: time no clock claims (a live run's tail since its last clock, or clocks that disagree "
        "with the wall), shown rather than spread over the states."
    )
    out = ["## Time by state", lead, _table(["state", "seconds", "share", amount], rows), note]
    if run.priced and acc.billed_s is not None:
        out.append(
            f"The $ total, {_usd(acc.cost)} (price assumed), is reckoned on {acc.cost_basis} "
            f"({_num(acc.billed_s)} s: what the cloud bills), not on the wall above."
        )
    return out


def _amount(run: _Run, seconds: float) -> str:
    return _usd(run.acc.dollars(seconds)) if run.priced else f"{seconds / 3600:,.2f}"


def _recovery_parts(r) -> str:
    """'6.1 / 0.2 / 0.1 / 14.8': where a recovery's seconds went, measured (accounting.Recovery)."""
    data = r.staging_s + r.data_s
    rest = max(r.recovery_s - r.nodes_s - data - r.restore_s, 0.0)
    return " / ".join(_num(x, ",.1f") for x in (r.nodes_s, data, r.restore_s, rest))


def _recoveries_section(run: _Run) -> list[str]:
    acc = run.acc
    if not run.clocked:
        return [
            "## Recoveries",
            "Unknown: no launch's clock in timeline.jsonl (a run from before timelines).",
        ]
    if not acc.recoveries:
        return ["## Recoveries", "None: no launch was lost."]
    lost = "lost $ (time measured x price assumed)" if run.priced else "lost hours (measured)"
    header = ["#", "heard last", "resumed step", "last step heard", "redone steps", "recovery s"]
    header += ["of which: nodes + setup / data / checkpoint load / Ray and the rest", "redone s"]
    rows = [
        [
            str(i),
            f"+{_hours(r.heard - run.t0)} ({_clock(r.heard)})",
            _num(r.resumed_step),
            _num(r.last_step),
            _num(r.redone_steps),
            _num(r.recovery_s),
            _recovery_parts(r),
            _num(r.redone_s),
            _amount(run, r.lost_s),
            "automatic" if r.automatic else "lmctl resume",
        ]
        for i, r in enumerate(acc.recoveries, 1)
    ]
    rows.append(["**all**", "", "", "", _num(acc.redone_steps), "", "", "", _amount(run, acc.lost_s), ""])
    note = (
        "Lost time: an automatic recovery's seconds (SkyPilot recovering a preempted job, all rented) plus "
        "the training time of the steps redone; after a crash and `lmctl resume`, only the redone steps."
    )
    return [f"## Recoveries ({len(acc.recoveries)})", _table([*header, lost, "how"], rows), note]


def _evals_section(run: _Run) -> list[str]:
    vals = [r for r in run.metrics if r.get("val_loss") is not None]
    scored = [r for r in run.metrics if r.get("evals")]
    if not vals and not scored:
        return ["## Evaluations", "None logged."]
    out = ["## Evaluations"]
    if vals:
        v = vals[-1]
        bpb = f", {v['val_bpb']:.4f} bits per byte" if v.get("val_bpb") is not None else ""
        out.append(f"Validation loss at step {v['step']:,}: {v['val_loss']:.4f}{bpb} (measured).")
    if scored:
        last = scored[-1]
        rows = [
            [
                task,
                _num(s.get("acc"), ".3f"),
                _num(s.get("acc_norm"), ".3f"),
                _num(s.get("chance"), ".3f"),
                _num(s.get("n")),
            ]
            for task, s in sorted(last["evals"].items())
        ]
        out.append(f"Tasks at the last evaluation, step {last['step']:,} (measured):")
        out.append(_table(["task", "acc", "acc_norm", "chance", "examples"], rows))
    return out


# ---------------------------------------------------------------- pictures


def _time_unit(run: _Run) -> tuple[float, str]:
    """Seconds per unit of the pictures' time axis, and its name: minutes for a short run, else hours."""
    span = max(run.acc.wall_s, run.now - run.t0 if run.acc.live else 0.0, _last_time(run) - run.t0)
    return (60.0, "minutes") if span < 2 * 3600 else (3600.0, "hours")


def _last_time(run: _Run) -> float:
    ends = [e for _, e, _ in run.acc.spans] + [r["time"] for r in run.train if _is_number(r.get("time"))]
    return max(ends, default=run.t0)


def _figure(width: float = 10, height: float = 5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _mark_recoveries(run: _Run, ax, unit: float, numbered: bool) -> list:
    """Each recovery: a dashed line where the lost launch was last heard, shaded (under what is drawn) until
    training resumed, numbered R1, R2, ... at the top; the time between segments (nothing running) hatched.
    Returns the legend handles for what it drew."""
    from matplotlib.patches import Patch

    for i, r in enumerate(run.acc.recoveries, 1):
        x0, x1 = (r.heard - run.t0) / unit, (r.resumed - run.t0) / unit
        ax.axvspan(x0, x1, color=RECOVERY_COLOUR, alpha=0.12, linewidth=0, zorder=0)
        ax.axvline(x0, color=RECOVERY_COLOUR, linestyle="--", linewidth=1, zorder=3)
        if numbered:
            ax.annotate(
                f"R{i}",
                xy=(x0, 0.99),
                xycoords=ax.get_xaxis_transform(),
                xytext=(3, 0),
                textcoords="offset points",
                va="top",
                fontsize=9,
                fontweight="bold",
                color=RECOVERY_COLOUR,
            )
    handles = []
    if run.acc.recoveries:
        handles.append(
            Patch(
                facecolor=RECOVERY_COLOUR,
                alpha=0.25,
                edgecolor=RECOVERY_COLOUR,
                label="recovery: last heard to training",
            )
        )
    gaps = _segment_gaps(run)
    for b, e in gaps:
        ax.axvspan(
            (b - run.t0) / unit,
            (e - run.t0) / unit,
            facecolor="none",
            edgecolor="#999999",
            hatch="//",
            linewidth=0,
            zorder=0,
        )
    if gaps:
        handles.append(
            Patch(facecolor="none", edgecolor="#999999", hatch="//", label="between launches: nothing ran")
        )
    return handles


def _segment_gaps(run: _Run) -> list[tuple[float, float]]:
    """From one segment's end to the next one's start: the run was not running (nor rented)."""
    segments = [s for s in run.record.segments if s[0] is not None]
    return [
        (float(a[1]), float(b[0])) for a, b in zip(segments, segments[1:], strict=False) if a[1] is not None
    ]


def _recovery_entries(run: _Run, unit: float, unit_abbrev: str) -> list:
    """Legend entries, one per recovery: 'R1 at 0.96 h: 200 steps redone, lost $4.39'."""
    from matplotlib.lines import Line2D

    entries = []
    for i, r in enumerate(run.acc.recoveries, 1):
        lost = _usd(run.acc.dollars(r.lost_s)) if run.priced else f"{r.lost_s / 3600:.2f} h"
        how = "" if r.automatic else " (lmctl resume)"
        at = f"R{i} at {(r.heard - run.t0) / unit:.2f} {unit_abbrev}{how}"
        label = f"{at}: {r.redone_steps:,} steps redone, lost {lost}"
        entries.append(Line2D([], [], color=RECOVERY_COLOUR, linestyle="--", linewidth=1, label=label))
    return entries


def _broken_at_gaps(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """The series with a NaN where it jumps over a gap (a recovery, a pause): no line across lost time."""
    steps = sorted(b - a for a, b in zip(xs, xs[1:], strict=False) if b > a)
    if not steps:
        return xs, ys
    limit = 3 * steps[len(steps) // 2]
    out_x, out_y = xs[:1], ys[:1]
    for i in range(1, len(xs)):
        if xs[i] - xs[i - 1] > limit:
            out_x, out_y = [*out_x, math.nan], [*out_y, math.nan]
        out_x, out_y = [*out_x, xs[i]], [*out_y, ys[i]]
    return out_x, out_y


def _speed_png(run: _Run, out: Path) -> None:
    """tokens/s, and MFU in a panel of its own below (the two are proportional on one GPU kind: on twin axes
    their lines would lie on each other); no MFU panel on a CPU run."""
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    unit, unit_name = _time_unit(run)
    timed = [r for r in run.train if _is_number(r.get("time")) and r.get("tokens_per_s")]
    xs = [(r["time"] - run.t0) / unit for r in timed]
    mfu = [(x, r["mfu"]) for x, r in zip(xs, timed, strict=True) if r.get("mfu") is not None]
    fig = _figure(10, 7 if mfu else 4.5)
    axes = fig.subplots(2 if mfu else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(
        *_broken_at_gaps(xs, [r["tokens_per_s"] for r in timed]),
        ".-",
        markersize=3,
        linewidth=1,
        label="tokens/s",
    )
    tops = [r["tokens_per_s"] for r in timed]
    if run.plan.get("tokens_per_s"):
        planned = run.plan["tokens_per_s"]
        tops.append(planned)
        ax.axhline(
            planned,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"planned (at an assumed {_pct(run.plan.get('mfu'))} MFU)",
        )
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: human(y)))
    ax.set_ylabel("tokens/s (measured)")
    ax.set_ylim(0, max(tops, default=1.0) * 1.12)
    ax.set_title(f"{run.name}: speed" + ("" if mfu else " (no MFU logged: a CPU, or a GPU of unknown peak)"))
    if mfu:
        m_ax = axes[1]
        m_ax.plot(
            *_broken_at_gaps([x for x, _ in mfu], [m for _, m in mfu]),
            ".-",
            color="#ff7f0e",
            markersize=3,
            linewidth=1,
            label="MFU",
        )
        m_tops = [m for _, m in mfu]
        if run.plan.get("mfu"):
            m_tops.append(run.plan["mfu"])
            m_ax.axhline(
                run.plan["mfu"], color="black", linestyle="--", linewidth=1, label="planned (assumed)"
            )
        m_ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        m_ax.set_ylabel("MFU (measured)")
        m_ax.set_ylim(0, max(m_tops) * 1.12)
    for i, a in enumerate(axes):
        marks = _mark_recoveries(run, a, unit, numbered=i == 0)
        a.grid(True, alpha=0.3)
        a.legend(
            handles=a.get_legend_handles_labels()[0] + (marks if i == 0 else []),
            loc="lower right",
            fontsize=8,
        )
        a.set_xlim(left=0, right=_right_edge(run, [x * unit for x in xs], unit, with_plan=False))
    axes[-1].set_xlabel(f"wall time since the run began ({unit_name})")
    fig.tight_layout()
    fig.savefig(out, format="png")


def _cost_png(run: _Run, out: Path) -> None:
    unit, unit_name = _time_unit(run)
    per_second, y_label, what = _rate(run)
    xs, layers = _cumulative(run, per_second)
    fig = _figure(11, 5.5)
    ax = fig.subplots()
    shown = [s for s in (*STATES, "unaccounted") if layers[s][-1] > 0]
    if not shown:
        _untimed_picture(run, fig, ax, out)
        return
    ax.stackplot(
        [x / unit for x in xs],
        *[layers[s] for s in shown],
        labels=shown,
        colors=[STATE_COLOURS[s] for s in shown],
        alpha=0.9,
        zorder=2,
    )
    _planned_line(run, ax, unit, per_second)
    if run.priced and run.acc.billed_s is not None:  # the total is reckoned on the job's time, not the wall
        label = f"total on {run.acc.cost_basis}: {_usd(run.acc.cost)} (price assumed)"
        ax.axhline(run.acc.cost, color="#555555", linestyle=":", linewidth=1.2, label=label, zorder=3)
    marks = _mark_recoveries(run, ax, unit, numbered=True)
    ax.set_xlim(left=0, right=_right_edge(run, xs, unit, with_plan=True))
    total = sum(layer[-1] for layer in layers.values())
    ax.set_ylim(bottom=0, top=max(_y_top(run, total, per_second, unit, ax), 1e-9) * 1.1)
    ax.set_xlabel(f"wall time since the run began ({unit_name})")
    ax.set_ylabel(y_label)
    ax.set_title(f"{run.name}: {what} by state, {_total_text(run, total)}", fontsize=11)
    ax.grid(True, alpha=0.3)
    drawn, labels = ax.get_legend_handles_labels()
    stack = [h for h, label in zip(drawn, labels, strict=True) if label in shown][::-1]  # top layer first
    handles = stack + [h for h, label in zip(drawn, labels, strict=True) if label not in shown] + marks
    handles += _recovery_entries(run, unit, unit_name[0])
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")


def _untimed_picture(run: _Run, fig, ax, out: Path) -> None:
    """A run from before time accounting: the picture says so rather than draw nothing."""
    why = f"Time {UNTIMED}" if not run.timed else "No time recorded yet: its first segment just began"
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    ax.set_title(f"{run.name}: no time recorded")
    fig.savefig(out, format="png")


def _rate(run: _Run) -> tuple[float, str, str]:
    """How much one wall second adds on the cost picture's y axis, the axis's label, and what it shows."""
    if run.priced:
        price = run.acc.price_per_hour
        return price / 3600, f"USD, cumulative (time measured x ${price:,.2f}/h assumed)", "cost"
    gpus = _gpu_count(run)
    if gpus:
        return gpus / 3600, f"GPU-hours, cumulative (measured; {gpus} GPUs, no price)", "GPU-hours"
    return 1 / 3600, "hours, cumulative (measured; no price)", "hours"


def _total_text(run: _Run, total: float) -> str:
    """The accounting's total: its $ (on its basis) for a priced run, else the stack's hours."""
    if run.priced:
        return f"{_usd(run.acc.cost)} in all ({run.acc.cost_basis} x price assumed)"
    return f"{total:,.2f} {_rate(run)[2]} in all"


def _cumulative(run: _Run, per_second: float) -> tuple[list[float], dict[str, list[float]]]:
    """x (seconds since t0) and each state's cumulative amount there: exact at span ends, linear between."""
    spans = sorted([*run.acc.spans, *_unaccounted_spans(run)])
    sums = dict.fromkeys((*STATES, "unaccounted"), 0.0)
    xs = [0.0]
    layers = {s: [0.0] for s in sums}
    for begin, end, state in spans:
        for x, add in ((begin, 0.0), (end, (end - begin) * per_second)):
            sums[state] += add
            xs.append(x - run.t0)
            for s in sums:
                layers[s].append(sums[s])
    return xs, layers


def _unaccounted_spans(run: _Run) -> list[tuple[float, float, str]]:
    """The stretches of the segments no span covers (a live run's tail since its last clock)."""
    out = []
    spans = sorted(run.acc.spans)
    for began, ended in run.record.segments:
        if began is None:
            continue
        end = ended if ended is not None else run.now
        cursor = began
        for b, e, _ in spans:
            if e <= cursor or b >= end:
                continue
            if b > cursor:
                out.append((cursor, b, "unaccounted"))
            cursor = max(cursor, e)
        if end > cursor:
            out.append((cursor, end, "unaccounted"))
    return out


def _planned_seconds(run: _Run) -> float | None:
    hours = run.plan.get("hours")
    return None if not hours else float(hours) * 3600


def _planned_line(run: _Run, ax, unit: float, per_second: float) -> None:
    """The plan at a constant rate: its hours x its price (or hours), from the run's start."""
    seconds = _planned_seconds(run)
    if seconds is None:
        return
    cost = run.plan.get("cost")
    total = cost if run.priced and cost is not None else seconds * per_second
    label = f"planned: {_usd(total) if run.priced else f'{total:,.2f}'} over {seconds / 3600:,.2f} h"
    label += " (estimate, assumed price)" if run.priced else " (estimate)"
    ax.plot([0, seconds / unit], [0, total], color="black", linestyle="--", linewidth=1.2, label=label)


def _right_edge(run: _Run, xs: list[float], unit: float, with_plan: bool) -> float:
    """The run's last second, or the plan's end when it is not far beyond (a far one would squash the run)."""
    end = max(max(xs, default=0.0), _last_time(run) - run.t0, 1.0)
    planned = _planned_seconds(run) if with_plan else None
    if planned is not None and planned <= 1.5 * end:
        end = max(end, planned)
    return end * 1.02 / unit


def _y_top(run: _Run, stacked: float, per_second: float, unit: float, ax) -> float:
    """The highest thing drawn inside the x range: the stack's top or the planned line there."""
    planned = _planned_seconds(run)
    if planned is None:
        return stacked
    right = ax.get_xlim()[1] * unit
    cost = run.plan.get("cost")
    total = cost if run.priced and cost is not None else planned * per_second
    return max(stacked, total * min(right / planned, 1.0))
