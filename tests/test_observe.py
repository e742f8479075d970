"""Observing runs: summaries, the status table, logs (followed), the attach dashboard and the loss plot.

Run directories are real files; a "driver" is a real process, so the effective state is the real one.
"""

import io
import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from rich.console import Console

from model.config import ConfigError
from orchestrator import observe, runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def render(renderable) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def train_rec(step: int, loss: float, t: float | None = None, gbt: int = 2048) -> dict:
    rec = {
        "step": step,
        "loss": loss,
        "lr": 0.003,
        "grad_norm": 0.9,
        "tokens": step * gbt,
        "tokens_per_s": 19200.0,
        "mfu": None,
    }
    if t is not None:
        rec["time"] = t
    return rec


def make_run(
    root: Path,
    name: str,
    state: str = "finished",
    driver=None,
    steps: int = 200,
    metrics: list[dict] | None = None,
    torn: str = "",
    log: str | None = None,
    message: str | None = None,
) -> Path:
    path = root / name
    (path / "logs").mkdir(parents=True)
    now = time.time()
    record = runs.RunRecord(
        name=name,
        mode="local",
        state=state,
        preset="tiny",
        created=now - 100,
        updated=now,
        store="file:///tmp/store",
        checkpoints=f"file:///tmp/store/runs/{name}/checkpoints",
        data="file:///tmp/store/datasets/shakespeare",
        steps=steps,
        global_batch_tokens=2048,
        driver=driver,
        launches=1,
        message=message,
    )
    runs.write_record(path, record)
    lines = "".join(json.dumps(r) + "\n" for r in metrics or [])
    (path / runs.METRICS).write_text(lines + torn)
    if log is not None:
        (path / runs.LOG).write_text(log)
    return path


def finished_metrics() -> list[dict]:
    return [
        train_rec(10, 6.8),
        train_rec(50, 5.9),
        {"step": 50, "val_loss": 5.76, "val_ppl": 318.3},
        {"step": 50, "checkpoint": 50},
        train_rec(100, 5.4),
        {"step": 100, "val_loss": 5.25, "val_ppl": 190.8},
        {"step": 100, "checkpoint": 100},
        train_rec(120, 5.31),
    ]


@pytest.fixture
def spawn():
    """Start real processes to serve as drivers; killed and reaped at the end of the test."""
    procs = []

    def start(*cmd: str) -> subprocess.Popen:
        p = subprocess.Popen(list(cmd), start_new_session=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def driver_of(p: subprocess.Popen) -> dict:
    return asdict(runs.Process.of(p.pid))


# ---------------------------------------------------------------- summaries


def test_summary_of_finished_run(tmp_path):
    path = make_run(tmp_path, "done", metrics=finished_metrics())
    s = observe.run_summary(path)
    assert (s["name"], s["state"], s["mode"]) == ("done", "finished", "local")
    assert (s["step"], s["steps"]) == (120, 200)
    assert s["loss"] == 5.31
    assert s["val_loss"] == 5.25 and s["val_step"] == 100
    assert s["last_checkpoint"] == 100
    assert s["tokens"] == 120 * 2048 and s["tokens_per_s"] == 19200.0
    assert s["eta_s"] is None  # only while running
    assert 0 <= s["age_s"] < 60
    assert s["path"] == str(path)
    json.dumps(s)  # the CLI prints it with --json


def test_summary_skips_torn_last_line_and_survives_missing_metrics(tmp_path):
    torn = make_run(
        tmp_path, "torn", metrics=[train_rec(10, 6.8), train_rec(20, 6.1)], torn='{"step": 30, "loss": 5.'
    )
    s = observe.run_summary(torn)
    assert (s["step"], s["loss"]) == (20, 6.1)

    empty = make_run(tmp_path, "empty", state="created")
    (empty / runs.METRICS).unlink()
    s = observe.run_summary(empty)
    assert (s["step"], s["loss"], s["val_loss"], s["last_checkpoint"]) == (0, None, None, None)


def test_running_record_with_dead_driver_is_failed(tmp_path, spawn):
    p = spawn("sleep", "30")
    driver = driver_of(p)
    p.kill()
    p.wait()
    path = make_run(tmp_path, "crashed", state="running", driver=driver, metrics=[train_rec(10, 6.8)])
    s = observe.run_summary(path)
    assert s["state"] == "failed" and s["claimed_state"] == "running"
    assert s["eta_s"] is None
    assert "driver is gone" in render(observe.status_detail(s))


def test_running_run_with_live_driver_has_an_eta(tmp_path, spawn):
    t0 = time.time() - 100
    metrics = [train_rec(step, 5.0, t0 + step * 0.5) for step in (10, 20, 30, 40)]  # 0.5 s per step
    path = make_run(
        tmp_path, "live", state="running", driver=driver_of(spawn("sleep", "30")), metrics=metrics
    )
    s = observe.run_summary(path)
    assert s["state"] == "running"
    assert s["eta_s"] == pytest.approx((200 - 40) * 0.5)


def test_eta_falls_back_to_throughput_without_times(tmp_path, spawn):
    path = make_run(
        tmp_path,
        "old",
        state="running",
        driver=driver_of(spawn("sleep", "30")),
        metrics=[train_rec(10, 6.0), train_rec(20, 5.5)],
    )
    s = observe.run_summary(path)
    assert s["eta_s"] == pytest.approx(180 * 2048 / 19200.0)


def test_status_table_and_detail_render_every_run(tmp_path, spawn):
    a = make_run(tmp_path, "alpha-run", metrics=finished_metrics())
    b = make_run(
        tmp_path,
        "beta-run",
        state="running",
        driver=driver_of(spawn("sleep", "30")),
        steps=500,
        metrics=[train_rec(40, 6.0)],
    )
    c = make_run(tmp_path, "gamma-run", state="stopped", metrics=[], message="stopped by user")
    text = render(observe.status_table([observe.run_summary(p) for p in (a, b, c)]))
    lines = text.splitlines()
    assert "tok/s" in lines[0] and "last ckpt" in lines[0]
    alpha, beta, gamma = (next(line for line in lines if n in line) for n in ("alpha", "beta", "gamma"))
    assert "120/200" in alpha and "finished" in alpha and "5.310" in alpha and "19.2K" in alpha
    assert "100" in alpha.split("19.2K")[1]  # last checkpoint column
    assert "40/500" in beta and "running" in beta
    assert "0/200" in gamma and "stopped" in gamma

    detail = render(observe.status_detail(observe.run_summary(c)))
    for fact in ("stopped by user", "file:///tmp/store/runs/gamma-run/checkpoints", str(c)):
        assert fact in detail


@pytest.mark.parametrize(
    "seconds, text", [(None, "-"), (0, "0s"), (12.2, "12s"), (200, "3m"), (7300, "2h"), (4 * 86400, "4d")]
)
def test_human_duration(seconds, text):
    assert observe.human_duration(seconds) == text


# ---------------------------------------------------------------- logs


def test_print_log_prints_the_file(tmp_path):
    path = make_run(tmp_path, "logged", log="hello\nworld \xe9\n")
    (path / runs.LOG).write_bytes((path / runs.LOG).read_bytes() + b"bad \xff byte\n")
    out = io.StringIO()
    observe.print_log(path, follow=False, out=out)
    assert out.getvalue() == "hello\nworld \xe9\nbad \ufffd byte\n"


def test_print_log_without_a_log_prints_nothing(tmp_path):
    out = io.StringIO()
    observe.print_log(make_run(tmp_path, "quiet", state="created"), follow=True, out=out)
    assert out.getvalue() == ""


def test_print_log_follow_returns_after_the_driver_exits(tmp_path, spawn):
    path = make_run(tmp_path, "follow", state="running", log="first\n")
    log = path / runs.LOG
    # the "driver" appends after a while and exits by itself; the record still claims "running"
    p = spawn("sh", "-c", f"sleep 0.3; echo appended-late >> '{log}'; exec sleep 0.2")
    runs.update_record(path, driver=driver_of(p))
    out = io.StringIO()
    observe.print_log(path, follow=True, out=out, poll_s=0.05)
    assert p.poll() is not None or not runs.Process(**driver_of(p)).alive()
    assert out.getvalue() == "first\nappended-late\n"


# ---------------------------------------------------------------- attach


def test_attach_on_ended_run_prints_one_frame(tmp_path):
    path = make_run(tmp_path, "over", metrics=finished_metrics(), log="training done\n")
    console = Console(file=io.StringIO(), width=120, color_system=None)
    assert observe.attach(path, console=console) == "ended"
    text = console.file.getvalue()
    assert "over" in text and "finished" in text and "5.310" in text and "training done" in text


def test_attach_follows_a_running_run_until_it_ends(tmp_path, spawn):
    path = make_run(tmp_path, "short", state="running", metrics=[train_rec(10, 6.0)], log="go\n")
    runs.update_record(path, driver=driver_of(spawn("sh", "-c", "exec sleep 0.4")))
    console = Console(file=io.StringIO(), width=120, color_system=None)
    assert observe.attach(path, refresh_s=0.05, console=console) == "ended"
    text = console.file.getvalue()
    assert text.count("lmctl attach short") == 1  # not a terminal: one final frame, no redraw spam
    assert "failed" in text  # the record still says running, but the driver is gone


def test_attach_detaches_on_ctrl_c(tmp_path, spawn, monkeypatch):
    path = make_run(
        tmp_path,
        "ctrlc",
        state="running",
        driver=driver_of(spawn("sleep", "30")),
        metrics=[train_rec(10, 6.0)],
    )

    def interrupt(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(observe.time, "sleep", interrupt)
    console = Console(file=io.StringIO(), width=120, color_system=None)
    assert observe.attach(path, console=console) == "detached"
    assert "running" in console.file.getvalue()


def test_dashboard_shows_progress_metrics_and_log_tail(tmp_path, spawn):
    log = "".join(f"line-{i:02d}|\n" for i in range(30))
    metrics = [*finished_metrics()[:-1], {**train_rec(120, 5.31), "mfu": 0.41}]
    path = make_run(
        tmp_path, "dash", state="running", driver=driver_of(spawn("sleep", "30")), metrics=metrics, log=log
    )
    text = render(observe.dashboard(path))
    assert "dash" in text and "running" in text and "120/200" in text and "60%" in text
    assert "5.310" in text and "5.250" in text and "41.0%" in text and "19.2K" in text
    assert "line-29|" in text and "line-18|" in text and "line-17|" not in text


def test_dashboard_without_log_or_metrics(tmp_path):
    text = render(observe.dashboard(make_run(tmp_path, "fresh", state="created", metrics=[])))
    assert "(no log yet)" in text and "0/200" in text and "mfu -" in text


# ---------------------------------------------------------------- plot


def test_plot_writes_a_png(tmp_path):
    path = make_run(tmp_path, "plotted", metrics=finished_metrics())
    out = observe.plot(path)
    assert out == path / "loss.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 1000
    assert not list(path.glob(".loss.*"))  # the temporary file was renamed, not left behind

    other = observe.plot(path, tmp_path / "elsewhere.png", logx=True)
    assert other.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_without_metrics_is_a_config_error(tmp_path):
    path = make_run(tmp_path, "blank", state="created", metrics=[{"step": 0, "checkpoint": 0}])
    with pytest.raises(ConfigError, match="run blank has no metrics yet"):
        observe.plot(path)
    assert not (path / "loss.png").exists()


def test_status_imports_nothing_heavy():
    code = (
        "import sys; from orchestrator import observe; "
        "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'ray', 'sky') if m in sys.modules))"
    )
    out = subprocess.run(
        [__import__("sys").executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_a_run_staging_its_data_shows_how_far_in_status_attach_and_its_log(tmp_path, spawn, capsys):
    """The driver stages a detached run's data: stage() reports through StagingReport into staging.json,
    which status and attach show while the run is active, and a line reaches the run's log; the file goes
    when the staging ends."""
    from model.config import DEFAULT_CORPUS, DataConfig
    from orchestrator.stage import StagingReport, stage

    path = make_run(tmp_path, "stg", state="staging", driver=driver_of(spawn("sleep", "30")), metrics=[])
    seen: list[dict] = []
    with StagingReport(path, "configs/data/shakespeare.jsonl", runs.read_record(path)) as report:
        report.SAY_EVERY_S = 0.0

        def hear(facts: dict) -> None:
            report(facts)
            seen.append(observe.run_summary(path)["staging"])

        data = DataConfig(dataset=str(DEFAULT_CORPUS))
        stage(data, f"file://{tmp_path}/store", vocab_size=300, work_dir=tmp_path / "work", on_progress=hear)
        assert (path / runs.STAGING).exists()
    assert not (path / runs.STAGING).exists() and observe.run_summary(path)["staging"] is None
    assert [s["phase"] for s in seen][:2] == ["training tokenizer", "tokenizing"]
    last = seen[-1]
    assert last["phase"] == "tokenizing" and last["tokens"] > 0 and last["documents"] > 0
    assert 0 < last["fraction"] <= 1 and last["tokens_per_s"] > 0 and last["eta_s"] >= 0
    (path / runs.STAGING).write_text(json.dumps(last))  # as it stood mid-staging
    detail, dash = render(observe.status_detail(observe.run_summary(path))), render(observe.dashboard(path))
    for text in (detail, dash):
        assert "tokenizing configs/data/shakespeare.jsonl" in text and "tok/s" in text and "eta" in text
    assert "tokenizing configs/data/shakespeare.jsonl:" in capsys.readouterr().out  # the log's line


def test_a_cloud_run_s_head_node_puts_its_staging_in_the_store_and_takes_it_away(tmp_path):
    """On a pod (a `cloud` record) staging.json is also put in the run's store, where the launching machine
    fetches it (SkyPilotBackend.refresh); it goes from both places when the staging ends."""
    from model.store import open_store
    from orchestrator.stage import StagingReport

    path = make_run(tmp_path, "pod", state="staging", metrics=[])
    record = runs.update_record(path, mode="cloud", store=f"file://{tmp_path}/store")
    store, key = open_store(record.store), runs.store_key("pod", runs.STAGING)
    with StagingReport(path, "org/set", record) as report:
        report({"phase": "tokenizing", "documents": 5, "tokens": 900, "tokens_per_s": 10.0})
        assert json.loads(store.get_bytes(key))["tokens"] == 900
        report({"phase": "tokenizing", "documents": 9, "tokens": 1800, "tokens_per_s": 10.0})
        assert json.loads(store.get_bytes(key))["tokens"] == 900  # the store hears it every 10 s, not more
        assert json.loads((path / runs.STAGING).read_text())["tokens"] == 1800
    assert not store.exists(key) and not (path / runs.STAGING).exists()
