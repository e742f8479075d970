"""Cloud runs at the SkyPilot boundary: launch, status, logs, stop, resume and attach through the CLI, with
SkyPilot's SDK faked (tests/skyfake.py) and everything else real: the tiny preset's data is staged into
a loopback S3 store (moto), config.yaml, metrics.jsonl, STOP and checkpoints live there, and the job
states are SkyPilot's own enums.

The module shares one bucket; every test launches its own run (its own name) with its own fake.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from model.config import ConfigError
from orchestrator import backends, cloud, launch, runs
from orchestrator.cli import main

# SkyPilot is a dependency everywhere but on the GPU check's machine, which runs `pytest -m gpu` without it
sky = pytest.importorskip("sky", reason="SkyPilot is not installed")
import skyfake  # noqa: E402  (needs sky)
from skyfake import JobStatus, ManagedJobStatus  # noqa: E402

SECRETS = {
    "WANDB_API_KEY": "canary-wandb-2f9c1e",
    "HF_TOKEN": "hf_canary_7d0b4a",
    "AWS_SESSION_TOKEN": "canary-session-a81c",
}
PRICE = 0.5  # --price: USD per GPU-hour


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory):
    """One bucket for the module, and the environment its runs see: the loopback endpoint, fake AWS
    credentials, canary secrets, a private cache; no API server may start."""
    from s3 import FAKE_KEY, FAKE_SECRET, REGION, make_bucket

    base = tmp_path_factory.mktemp("cloud")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "LMCTL_STORE", "LMCTL_RUNS_DIR", "AWS_REGION"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(base / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(base / "no-aws-config"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_ENDPOINT_URL", s3_server)
        mp.setenv("LMCTL_CACHE", str(base / "cache"))
        mp.setenv("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
        for k, v in SECRETS.items():
            mp.setenv(k, v)
        yield make_bucket(s3_server)


@pytest.fixture
def fake(monkeypatch, bucket) -> skyfake.FakeSky:
    """A fresh fake SDK; `lmctl stop` polls it without pausing (the scripted states decide, not time)."""
    monkeypatch.setattr(backends.SkyPilotBackend, "poll_s", 0.0)
    fake = skyfake.install(monkeypatch)
    yield fake
    assert not fake.pending, f"requests never waited for: {sorted(fake.pending)}"


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def store(bucket):
    from model.store import open_store

    return open_store(bucket.uri)


def lmctl(capsys, *argv: str) -> tuple[int, str, str]:
    """The CLI as a script runs it: a launch or resume says --yes to the spending (no terminal to ask on)."""
    spends = argv[0] in ("launch", "resume") and "--dry-run" not in argv and "--yes" not in argv
    code = main([*argv, *(["--yes"] if spends else [])])
    out = capsys.readouterr()
    return code, out.out, out.err


def start(capsys, bucket, root: Path, name: str, *extra: str, gpu: str = "RTX4090") -> runs.RunRecord:
    """`lmctl launch` of the tiny preset on `gpu`; asserts it went through."""
    argv = ["launch", "--config", "tiny", "--gpu", gpu, "--name", name, "--store", bucket.uri]
    code, out, err = lmctl(capsys, *argv, "--runs-dir", str(root), "--price", str(PRICE), *extra)
    assert code == 0, err
    assert f"launched run {name}" in out
    return runs.read_record(root / name)


def status(capsys, root: Path, name: str) -> dict:
    code, out, err = lmctl(capsys, "status", name, "--json", "--runs-dir", str(root))
    assert code == 0, err
    return json.loads(out)


def put_metrics(store, name: str, *rows: dict) -> None:
    store.put_bytes(runs.store_key(name, runs.METRICS), "".join(json.dumps(r) + "\n" for r in rows).encode())


def commit_checkpoint(bucket, name: str, step: int) -> None:
    """A committed checkpoint of `step` in the store, as the workers write it."""
    import torch

    from model.checkpoint import Checkpointer

    Checkpointer(f"{bucket.uri}/runs/{name}/checkpoints").save(step, {"model": {"w": torch.zeros(2)}}, {})


# ---------------------------------------------------------------- the fake itself


def test_the_fake_holds_calls_to_skypilots_signatures_and_nothing_else_is_reachable(fake):
    with pytest.raises(TypeError):
        sky.jobs.launch(sky.Task(name="t", run="echo"), nmae="t")  # a typo SkyPilot would refuse
    with pytest.raises(TypeError):
        sky.job_status("c", job_id=[1])
    with pytest.raises(RuntimeError, match="SKYPILOT_DISABLE_LOCAL_API_SERVER"):
        sky.status()  # not faked: no API server to reach, none started
    rid = sky.jobs.cancel(job_ids=[1])
    assert sky.get(rid) is None and fake.called("jobs.cancel")[0]["job_ids"] == [1]
    with pytest.raises(AssertionError, match="not a request id"):
        sky.get(rid)  # each request is answered once


# ---------------------------------------------------------------- launch


def test_managed_launch_stages_the_data_and_submits_the_task_with_secrets(capsys, bucket, root, fake, store):
    record = start(capsys, bucket, root, "managed")
    (call,) = fake.called("jobs.launch")
    task = call["task"]
    assert isinstance(task, sky.Task) and call["name"] == "managed" and task.name == "managed"
    sent = {k: v.get_secret_value() for k, v in task.secrets.items()}
    assert {k: sent.get(k) for k in SECRETS} == SECRETS
    assert sent["AWS_ACCESS_KEY_ID"] == "testing" and sent["AWS_SECRET_ACCESS_KEY"] == "testing"
    on_disk = "".join(p.read_text() for p in (root / "managed").rglob("*") if p.is_file())
    assert not [v for v in SECRETS.values() if v in on_disk]
    assert fake.count("stream_and_get") == 1 and fake.count("launch") == 0

    assert (record.state, record.job_id, record.cluster, record.launches) == ("starting", 41, None, 1)
    assert record.workers == 1 and record.gpu == "RTX4090:1" and record.price_per_hour == PRICE

    # config.yaml in the store names the dataset start_cloud staged into the same store
    config = yaml.safe_load(store.get_bytes(runs.store_key("managed", runs.CONFIG)))
    data = config["data"]["path"]
    assert data.startswith(f"{bucket.uri}/datasets/") and record.data == data
    assert store.exists(data.removeprefix(bucket.uri + "/") + "/manifest.json")
    assert config == yaml.safe_load((root / "managed" / runs.CONFIG).read_text())


def test_no_managed_launch_is_a_cluster_that_tears_itself_down(capsys, bucket, root, fake):
    record = start(capsys, bucket, root, "plain", "--no-managed")
    assert fake.count("jobs.launch") == 0
    (call,) = fake.called("launch")
    assert call["cluster_name"] == "plain" and call["down"] is True
    assert call["idle_minutes_to_autostop"] == cloud.AUTODOWN_IDLE_MINUTES > 0
    assert call["task"].name == "plain" and all(r.job_recovery is None for r in call["task"].resources)
    assert (record.managed, record.cluster, record.job_id, record.state) == (False, "plain", 41, "starting")


def test_skypilot_refusing_the_launch_is_one_line_and_a_failed_run(capsys, bucket, root, fake):
    fake.launch_error = sky.exceptions.ResourcesUnavailableError("no capacity\nmore detail here")
    argv = ["launch", "--config", "tiny", "--gpu", "RTX4090", "--name", "refused", "--store", bucket.uri]
    code, out, err = lmctl(capsys, *argv, "--runs-dir", str(root), "--json")  # --json: no plan table
    assert code == 2
    # stderr: the staging progress lines, then exactly one error line
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert "SkyPilot could not launch refused: no capacity" in err and "more detail" not in err
    record = runs.read_record(root / "refused")
    assert record.state == "failed" and "no capacity" in record.message and record.job_id is None
    assert fake.count("jobs.launch") == 1


# ---------------------------------------------------------------- spending: asked first, capped


class Terminal(io.StringIO):
    """stdin as a terminal on which the user types the text given."""

    def isatty(self) -> bool:
        return True


def launch_argv(bucket, root: Path, name: str, *extra: str) -> list[str]:
    base = ["launch", "--config", "tiny", "--gpu", "RTX4090", "--name", name, "--store", bucket.uri]
    return [*base, "--runs-dir", str(root), "--price", str(PRICE), *extra]


def test_a_cloud_launch_without_a_terminal_needs_yes_and_writes_nothing(capsys, bucket, root, fake):
    code = main(launch_argv(bucket, root, "unasked"))  # main(), not lmctl(): that one says --yes
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "launch rents 1 x RTX4090 for about" in err and "add --yes to go ahead" in err and "$" in err
    assert not (root / "unasked").exists() and fake.count("jobs.launch") == 0


def test_a_cloud_launch_asks_on_a_terminal_and_only_yes_launches(capsys, bucket, root, fake, monkeypatch):
    for answer, launched in (("n\n", False), ("\n", False), ("y\n", True)):
        monkeypatch.setattr(sys, "stdin", Terminal(answer))
        name = f"asked-{len(fake.called('jobs.launch'))}-{answer.strip() or 'enter'}"
        code = main(launch_argv(bucket, root, name))
        err = capsys.readouterr().err
        assert "Go ahead? [y/N]" in err and "cost" in err  # the plan table is shown first, then the question
        assert (code == 0) == launched and (root / name).exists() == launched, err
        assert launched or "not confirmed: nothing launched" in err
    assert fake.count("jobs.launch") == 1


def test_max_cost_refuses_a_plan_above_it_before_anything_is_written(capsys, bucket, root, fake):
    long_run = ["--override", "train.steps=100000000"]  # 2e11 tokens: about $2.5 at PRICE
    code, out, err = lmctl(capsys, *launch_argv(bucket, root, "capped", *long_run, "--max-cost", "1"))
    assert code == 2 and "is above --max-cost $1.00" in err and "train fewer steps" in err, err
    assert not (root / "capped").exists() and fake.count("jobs.launch") == 0
    code, out, err = lmctl(capsys, *launch_argv(bucket, root, "afforded", *long_run, "--max-cost", "100"))
    assert code == 0 and fake.count("jobs.launch") == 1, err


def test_max_cost_without_a_price_is_refused_rather_than_guessed():
    from types import SimpleNamespace

    unpriced = SimpleNamespace(cost=None, gpu="RTX5090", cloud="runpod")
    with pytest.raises(ConfigError, match="no price is known for RTX5090 on runpod; give --price"):
        launch.check_spending(unpriced, max_cost=10)
    launch.check_spending(unpriced, max_cost=None)  # no cap asked for: nothing to check


# ---------------------------------------------------------------- status


def test_status_follows_skypilot_and_the_store(capsys, bucket, root, fake, store):
    start(capsys, bucket, root, "watched")
    fake.script(ManagedJobStatus.PENDING, job_duration=None)
    assert status(capsys, root, "watched")["state"] == "starting"

    put_metrics(
        store,
        "watched",
        {"step": 10, "loss": 5.25, "lr": 1e-3, "tokens_per_s": 900.0, "time": 1.0},
        {"step": 20, "loss": 4.5, "lr": 2e-3, "tokens_per_s": 1000.0, "time": 2.0},
        {"step": 20, "checkpoint": 20},
    )
    fake.script(ManagedJobStatus.RUNNING, job_duration=7200.0, recovery_count=0)
    s = status(capsys, root, "watched")
    assert (s["state"], s["step"], s["loss"], s["last_checkpoint"]) == ("running", 20, 4.5, 20)
    assert s["job_id"] == 41 and s["gpu"] == "RTX4090:1" and s["cloud"] == "any"
    assert s["cost_so_far"] == pytest.approx(PRICE * 7200 / 3600)
    assert (root / "watched" / runs.METRICS).is_file()

    fake.script(ManagedJobStatus.RECOVERING, job_duration=9000.0, recovery_count=1)
    s = status(capsys, root, "watched")
    assert (s["state"], s["recoveries"]) == ("recovering", 1)
    assert s["cost_so_far"] == pytest.approx(PRICE * 9000 / 3600)
    (queried,) = {tuple(c["job_ids"]) for c in fake.called("jobs.queue_v2")}
    assert queried == (41,)

    commit_checkpoint(bucket, "watched", 200)  # the last step: the job that ends now has finished
    fake.script(ManagedJobStatus.SUCCEEDED, job_duration=10800.0, recovery_count=1)
    s = status(capsys, root, "watched")
    assert (s["state"], s["cost_so_far"]) == ("finished", pytest.approx(PRICE * 3))


def test_status_shows_the_nodes_staging_and_bills_the_time_it_takes(capsys, bucket, root, fake, store):
    """A cloud run's head node stages a hub dataset before training and puts its progress in the store
    (stage.StagingReport): status and attach show it, and the cost so far counts the job's time, staging
    included, since the GPUs are rented from the job's start."""
    start(capsys, bucket, root, "staging")
    facts = {"dataset": "org/set", "phase": "tokenizing", "documents": 1200, "tokens": 3_400_000}
    facts |= {"tokens_per_s": 820_000.0, "fraction": 0.41, "eta_s": 120.0, "time": 1.0}
    store.put_bytes(runs.store_key("staging", runs.STAGING), json.dumps(facts).encode())
    fake.script(ManagedJobStatus.RUNNING, job_duration=600.0, recovery_count=0)
    s = status(capsys, root, "staging")
    assert s["state"] == "running" and s["staging"]["tokens"] == 3_400_000 and s["step"] == 0
    assert s["cost_so_far"] == pytest.approx(PRICE * 600 / 3600)
    code, out, _ = lmctl(capsys, "status", "staging", "--runs-dir", str(root))
    assert code == 0 and "tokenizing org/set: 1.2K docs, 3.4M tokens, 820.0K tok/s, 41%" in out

    store.delete(runs.store_key("staging", runs.STAGING))  # staged: the head node trains now
    fake.script(ManagedJobStatus.RUNNING, job_duration=660.0, recovery_count=0)
    assert status(capsys, root, "staging")["staging"] is None


@pytest.mark.parametrize("checkpoint, expected", [(200, "finished"), (150, "stopped"), (None, "stopped")])
def test_a_job_that_succeeded_finished_only_with_its_last_step_committed(
    capsys, bucket, root, fake, checkpoint, expected
):
    name = f"ends-{checkpoint}"
    start(capsys, bucket, root, name)
    if checkpoint is not None:
        commit_checkpoint(bucket, name, checkpoint)
    fake.script(ManagedJobStatus.SUCCEEDED, job_duration=60.0)
    s = status(capsys, root, name)
    assert s["state"] == expected and s["steps"] == 200
    assert runs.read_record(root / name).state == expected
    polls = fake.count("jobs.queue_v2")
    assert status(capsys, root, name)["state"] == expected
    assert fake.count("jobs.queue_v2") == polls  # an ended run is not asked about again


@pytest.mark.parametrize(
    "sky_status",
    [ManagedJobStatus.FAILED, ManagedJobStatus.FAILED_SETUP, ManagedJobStatus.FAILED_NO_RESOURCE],
)
def test_a_failed_job_fails_the_run_with_skypilots_reason(capsys, bucket, root, fake, sky_status):
    name = f"fails-{sky_status.value.lower().replace('_', '-')}"
    start(capsys, bucket, root, name)
    fake.script(sky_status, failure_reason=f"{sky_status.value}: exit code 1 on the head node")
    s = status(capsys, root, name)
    assert s["state"] == "failed" and s["message"] == f"{sky_status.value}: exit code 1 on the head node"


def test_cancelled_job_is_stopped(capsys, bucket, root, fake):
    start(capsys, bucket, root, "cancelled")
    fake.script(ManagedJobStatus.CANCELLED)
    assert status(capsys, root, "cancelled")["state"] == "stopped"


def test_a_job_skypilot_no_longer_knows_has_failed(capsys, bucket, root, fake):
    start(capsys, bucket, root, "forgotten")
    fake.jobs.clear()
    s = status(capsys, root, "forgotten")
    assert s["state"] == "failed" and "SkyPilot has no job 41" in s["message"]


def test_status_shows_the_last_known_state_when_skypilot_is_unreachable(capsys, bucket, root, fake, store):
    start(capsys, bucket, root, "offline")
    fake.script(ManagedJobStatus.RUNNING, job_duration=3600.0)
    assert status(capsys, root, "offline")["state"] == "running"
    fake.unreachable = sky.exceptions.ApiServerConnectionError("http://127.0.0.1:46580")
    code, out, err = lmctl(capsys, "status", "offline", "--json", "--runs-dir", str(root))
    assert code == 0
    assert json.loads(out)["state"] == "running"
    assert err.startswith("warning: offline: last known state shown") and err.count("\n") == 1
    code, out, err = lmctl(capsys, "status", "--runs-dir", str(root))  # the table too
    assert code == 0 and "offline" in out and "warning: offline" in err


def test_cluster_job_states(capsys, bucket, root, fake):
    start(capsys, bucket, root, "plain-states", "--no-managed")
    for sky_status, state in [
        (JobStatus.INIT, "starting"),
        (JobStatus.SETTING_UP, "starting"),
        (JobStatus.RUNNING, "running"),
        (JobStatus.FAILED_DRIVER, "failed"),
    ]:
        runs.update_record(root / "plain-states", state="running")  # so status asks again
        fake.script(sky_status)
        assert status(capsys, root, "plain-states")["state"] == state, sky_status
    (cluster,) = {c["cluster_name"] for c in fake.called("job_status")}
    assert cluster == "plain-states" and fake.count("jobs.queue_v2") == 0
    assert all(c["job_ids"] == [41] for c in fake.called("job_status"))


# ---------------------------------------------------------------- logs and attach


def test_logs_come_from_skypilot(capsys, bucket, root, fake):
    start(capsys, bucket, root, "talky")
    assert lmctl(capsys, "logs", "talky", "--runs-dir", str(root))[0] == 0
    assert lmctl(capsys, "logs", "talky", "-f", "--runs-dir", str(root))[0] == 0
    assert [(c["job_id"], c["follow"]) for c in fake.called("jobs.tail_logs")] == [(41, False), (41, True)]
    assert fake.count("tail_logs") == 0


def test_logs_of_a_cluster_run(capsys, bucket, root, fake):
    start(capsys, bucket, root, "talky-plain", "--no-managed")
    assert lmctl(capsys, "logs", "talky-plain", "--runs-dir", str(root))[0] == 0
    assert lmctl(capsys, "logs", "talky-plain", "-f", "--runs-dir", str(root))[0] == 0
    got = [(c["cluster_name"], c["job_id"], c["follow"]) for c in fake.called("tail_logs")]
    assert got == [("talky-plain", 41, False), ("talky-plain", 41, True)]
    assert fake.count("jobs.tail_logs") == 0


def test_logs_when_skypilot_fails_are_one_line(capsys, bucket, root, fake):
    start(capsys, bucket, root, "mute")
    fake.unreachable = sky.exceptions.ApiServerConnectionError("http://127.0.0.1:46580")
    code, out, err = lmctl(capsys, "logs", "mute", "--runs-dir", str(root))
    assert (
        code == 2
        and err.startswith("error: SkyPilot could not read the logs of mute")
        and err.count("\n") == 1
    )


def test_attach_shows_the_gpu_the_job_and_the_cost(capsys, bucket, root, fake, store):
    """attach refreshes from SkyPilot while the job runs and returns when it has ended; refresh_s=0:
    the scripted states, not the clock, end it."""
    from rich.console import Console

    from orchestrator import observe

    start(capsys, bucket, root, "shown")
    put_metrics(store, "shown", {"step": 50, "loss": 3.5, "lr": 1e-3, "time": 5.0})
    fake.script(ManagedJobStatus.RUNNING, ManagedJobStatus.RUNNING, ManagedJobStatus.CANCELLED)
    fake.job_duration, fake.recovery_count = 1800.0, 2
    buf = io.StringIO()
    path = root / "shown"
    ended = observe.attach(
        path,
        refresh_s=0,
        refresh_every_s=0,
        refresh=lambda: backends.SkyPilotBackend().refresh(path),
        console=Console(file=buf, width=120),
    )
    assert ended == "ended" and fake.count("jobs.queue_v2") == 3
    text = buf.getvalue()
    assert "RTX4090:1 x 1 node(s) on any" in text and "job 41" in text and "recoveries 2" in text
    assert f"cost so far ${PRICE * 1800 / 3600:,.2f} at ${PRICE:,.2f}/h" in text
    assert "step 50/200" in text and "stopped" in text


def test_attach_through_the_cli(capsys, bucket, root, fake):
    start(capsys, bucket, root, "shown-cli")
    fake.script(ManagedJobStatus.SUCCEEDED, job_duration=7200.0)
    code, out, err = lmctl(capsys, "attach", "shown-cli", "--runs-dir", str(root))
    assert code == 0, err
    assert "job 41" in out and f"cost so far ${PRICE * 2:,.2f}" in out and "stopped" in out


# ---------------------------------------------------------------- stop


def test_stop_asks_the_workers_through_the_store_and_the_job_ends_by_itself(
    capsys, bucket, root, fake, store
):
    start(capsys, bucket, root, "stopped-clean")
    fake.script(ManagedJobStatus.RUNNING, ManagedJobStatus.RUNNING, ManagedJobStatus.SUCCEEDED)
    stop_key = runs.store_key("stopped-clean", runs.STOP)
    record = launch.stop("stopped-clean", root=root, timeout=60)
    assert store.exists(stop_key)
    assert record.state == "stopped" and fake.count("jobs.cancel") == 0
    assert runs.read_record(root / "stopped-clean").state == "stopped"


def test_stop_cancels_a_job_that_does_not_end_in_time(capsys, bucket, root, fake, store, monkeypatch):
    monkeypatch.setattr(backends.SkyPilotBackend, "poll_s", 0.01)  # until the 0.05 s timeout
    start(capsys, bucket, root, "stubborn")
    fake.script(ManagedJobStatus.RUNNING)
    record = launch.stop("stubborn", root=root, timeout=0.05)
    assert store.exists(runs.store_key("stubborn", runs.STOP))
    assert [c["job_ids"] for c in fake.called("jobs.cancel")] == [[41]]
    assert record.state == "stopped" and "cancelled" in record.message
    assert fake.count("down") == 0


def test_stop_through_the_cli(capsys, bucket, root, fake, store):
    start(capsys, bucket, root, "cli-stop")
    fake.script(ManagedJobStatus.RUNNING, ManagedJobStatus.SUCCEEDED)
    commit_checkpoint(bucket, "cli-stop", 100)
    put_metrics(store, "cli-stop", {"step": 100, "loss": 3.0}, {"step": 100, "checkpoint": 100})
    code, out, err = lmctl(capsys, "stop", "cli-stop", "--runs-dir", str(root), "--timeout", "30")
    assert code == 0, err
    assert "run cli-stop stopped: last checkpoint at step 100" in out
    code, out, err = lmctl(capsys, "stop", "cli-stop", "--runs-dir", str(root))
    assert code == 0 and "is not running (stopped)" in out


def test_stop_of_a_cluster_run_takes_the_cluster_down(capsys, bucket, root, fake, store):
    start(capsys, bucket, root, "plain-stop", "--no-managed")
    fake.script(JobStatus.RUNNING, JobStatus.SUCCEEDED)
    record = launch.stop("plain-stop", root=root, timeout=60)
    assert record.state == "stopped" and store.exists(runs.store_key("plain-stop", runs.STOP))
    assert [c["cluster_name"] for c in fake.called("down")] == ["plain-stop"]
    assert fake.count("jobs.cancel") == 0


def test_stop_of_a_stuck_cluster_run_takes_it_down_once(capsys, bucket, root, fake, monkeypatch):
    monkeypatch.setattr(backends.SkyPilotBackend, "poll_s", 0.01)
    start(capsys, bucket, root, "plain-stuck", "--no-managed")
    fake.script(JobStatus.RUNNING)
    record = launch.stop("plain-stuck", root=root, timeout=0.05)
    assert record.state == "stopped" and "cancelled" in record.message
    assert [c["cluster_name"] for c in fake.called("down")] == ["plain-stuck"]


# ---------------------------------------------------------------- resume


def test_resume_is_refused_while_the_job_runs(capsys, bucket, root, fake):
    start(capsys, bucket, root, "busy")
    fake.script(ManagedJobStatus.RUNNING)
    code, out, err = lmctl(capsys, "resume", "busy", "--runs-dir", str(root))
    assert code == 2 and err.startswith("error: run 'busy' is running") and err.count("\n") == 1
    assert fake.count("jobs.launch") == 1


def test_resume_after_stop_clears_stop_and_launches_again(capsys, bucket, root, fake, store):
    start(capsys, bucket, root, "again")
    fake.script(ManagedJobStatus.RUNNING, ManagedJobStatus.SUCCEEDED)
    launch.stop("again", root=root, timeout=60)
    assert store.exists(runs.store_key("again", runs.STOP))

    code, out, err = lmctl(capsys, "resume", "again", "--runs-dir", str(root))
    assert code == 0, err
    assert "resumed run again (launch 2" in out and "SkyPilot job 42" in out
    assert not store.exists(runs.store_key("again", runs.STOP))
    assert [c["name"] for c in fake.called("jobs.launch")] == ["again", "again"]
    record = runs.read_record(root / "again")
    assert (record.state, record.launches, record.job_id, record.message) == ("starting", 2, 42, None)


def test_resume_steps_extends_a_finished_cloud_run_once_the_spending_is_confirmed(
    capsys, bucket, root, fake, store
):
    start(capsys, bucket, root, "longer", "--override", "train.schedule=wsd")
    commit_checkpoint(bucket, "longer", 200)
    fake.script(ManagedJobStatus.SUCCEEDED, job_duration=60.0)
    assert status(capsys, root, "longer")["state"] == "finished"
    config = (root / "longer" / runs.CONFIG).read_text()

    code = main(["resume", "longer", "--steps", "400", "--runs-dir", str(root)])  # no terminal, no --yes
    err = capsys.readouterr().err
    assert code == 2 and "resume rents 1 x RTX4090" in err and "add --yes" in err
    assert (root / "longer" / runs.CONFIG).read_text() == config and fake.count("jobs.launch") == 1

    code, out, err = lmctl(capsys, "resume", "longer", "--steps", "400", "--runs-dir", str(root))
    assert code == 0, err
    assert "extending from 200 to 400 steps" in err and "re-warms" in err
    pod_config = yaml.safe_load(store.get_bytes(runs.store_key("longer", runs.CONFIG)))
    assert pod_config["train"]["steps"] == 400 and pod_config["train"]["schedule"] == "wsd"
    record = runs.read_record(root / "longer")
    assert (record.steps, record.launches, record.state) == (400, 2, "starting")
    assert fake.count("jobs.launch") == 2


def test_resume_on_other_gpus_keeps_the_global_batch(capsys, bucket, root, fake, store):
    from model.config import load_spec

    start(capsys, bucket, root, "moved")
    before = load_spec(root / "moved" / runs.CONFIG)
    fake.script(ManagedJobStatus.FAILED_NO_RESOURCE, failure_reason="no RTX4090 anywhere")
    code, out, err = lmctl(
        capsys,
        "resume",
        "moved",
        "--gpu",
        "H100:8",
        "--cloud",
        "aws",
        "--price",
        "2",
        "--runs-dir",
        str(root),
    )
    assert code == 0, err
    record = runs.read_record(root / "moved")
    assert (record.gpu, record.workers, record.cloud, record.launches) == ("H100-SXM:8", 8, "aws", 2)
    assert record.price_per_hour == pytest.approx(2 * 8)

    task = sky.Task.from_yaml(str(root / "moved" / runs.TASK))
    assert [(str(r.cloud).lower(), r.accelerators) for r in task.resources] == [("aws", {"H100": 8})]
    assert fake.called("jobs.launch")[-1]["task"].name == "moved"
    assert [dict(r.accelerators) for r in fake.called("jobs.launch")[-1]["task"].resources] == [{"H100": 8}]

    after = load_spec(root / "moved" / runs.CONFIG)
    assert after.train.global_batch_tokens == before.train.global_batch_tokens
    assert after.data.path == before.data.path
    seqs = after.train.global_batch_tokens // after.model.seq_len
    assert after.train.micro_batch_size * after.grad_accum_steps(8) * 8 == seqs
    stored = yaml.safe_load(store.get_bytes(runs.store_key("moved", runs.CONFIG)))
    assert stored["train"] == after.model_dump(mode="json")["train"]


def test_resume_refuses_hardware_the_run_cannot_use_and_changes_nothing(capsys, bucket, root, fake):
    start(capsys, bucket, root, "stays")
    fake.script(ManagedJobStatus.CANCELLED)
    files = {p.name: p.read_bytes() for p in (root / "stays").iterdir() if p.suffix == ".yaml"}
    code, out, err = lmctl(
        capsys, "resume", "stays", "--gpu", "H100:8", "--nodes", "4", "--runs-dir", str(root)
    )
    assert code == 2 and "does not split over 32 GPUs" in err
    assert {p.name: p.read_bytes() for p in (root / "stays").iterdir() if p.suffix == ".yaml"} == files
    assert runs.read_record(root / "stays").gpu == "RTX4090:1" and fake.count("jobs.launch") == 1


def test_a_dry_run_is_started_by_resume(capsys, bucket, root, fake, store):
    argv = ["launch", "--config", "tiny", "--gpu", "RTX4090", "--name", "later", "--store", bucket.uri]
    assert lmctl(capsys, *argv, "--runs-dir", str(root), "--dry-run")[0] == 0
    assert fake.calls == [] and not store.exists(runs.store_key("later", runs.CONFIG))
    code, out, err = lmctl(capsys, "resume", "later", "--runs-dir", str(root))
    assert code == 0, err
    assert [c["name"] for c in fake.called("jobs.launch")] == ["later"]
    record = runs.read_record(root / "later")
    assert (record.state, record.launches, record.job_id) == ("starting", 1, 41)
    assert store.exists(runs.store_key("later", runs.CONFIG)) and record.data.startswith(bucket.uri)


# ---------------------------------------------------------------- bugs found at this boundary, fixed


def test_a_launch_into_a_missing_bucket_is_one_line(capsys, bucket, root, fake):
    argv = ["launch", "--config", "tiny", "--gpu", "RTX4090", "--name", "nobucket"]
    code, out, err = lmctl(capsys, *argv, "--store", "s3://no-such-bucket-here/x", "--runs-dir", str(root))
    assert code == 2 and "bucket 'no-such-bucket-here' does not exist" in err and fake.calls == []


def test_launch_json_prints_only_json(capsys, bucket, root, fake):
    argv = ["launch", "--config", "tiny", "--gpu", "RTX4090", "--name", "as-json", "--store", bucket.uri]
    code, out, err = lmctl(capsys, *argv, "--runs-dir", str(root), "--json")
    assert code == 0, err
    assert json.loads(out)["job_id"] == 41


def test_a_stopped_cluster_run_can_be_resumed(capsys, bucket, root, fake):
    start(capsys, bucket, root, "plain-again", "--no-managed")
    fake.script(JobStatus.RUNNING, JobStatus.SUCCEEDED)
    assert launch.stop("plain-again", root=root, timeout=60).state == "stopped"
    assert "plain-again" not in fake.clusters  # stop took it down
    code, out, err = lmctl(capsys, "resume", "plain-again", "--runs-dir", str(root))
    assert code == 0, err
    assert [c["cluster_name"] for c in fake.called("launch")] == ["plain-again", "plain-again"]


def test_a_cluster_run_whose_cluster_is_gone_has_ended(capsys, bucket, root, fake):
    start(capsys, bucket, root, "plain-gone", "--no-managed")
    fake.script(JobStatus.RUNNING)
    assert status(capsys, root, "plain-gone")["state"] == "running"
    fake.clusters.discard("plain-gone")  # the job ended, the cluster went down by itself when idle
    code, out, err = lmctl(capsys, "status", "plain-gone", "--json", "--runs-dir", str(root))
    assert json.loads(out)["state"] not in runs.ACTIVE, err


def test_stop_writes_stop_even_when_skypilot_is_unreachable(capsys, bucket, root, fake, store):
    start(capsys, bucket, root, "stop-offline")
    fake.unreachable = sky.exceptions.ApiServerConnectionError("http://127.0.0.1:46580")
    code, out, err = lmctl(capsys, "stop", "stop-offline", "--runs-dir", str(root), "--timeout", "0")
    assert err.count("error:") <= 1 and "Traceback" not in err
    assert store.exists(runs.store_key("stop-offline", runs.STOP))  # the workers stop without SkyPilot


def test_resume_on_other_gpus_keeps_the_image_disk_and_cluster_mode(capsys, bucket, root, fake):
    image = "docker:nvcr.io/nvidia/pytorch:25.01-py3"
    start(capsys, bucket, root, "kept", "--image", image, "--disk-size", "300", "--no-managed")
    fake.script(JobStatus.CANCELLED)
    code, out, err = lmctl(
        capsys, "resume", "kept", "--gpu", "H100:8", "--cloud", "aws", "--runs-dir", str(root)
    )
    assert code == 0, err
    (r,) = sky.Task.from_yaml(str(root / "kept" / runs.TASK)).resources
    assert (r.extract_docker_image(), r.disk_size) == (image.removeprefix("docker:"), 300)
    assert fake.count("launch") == 2 and runs.read_record(root / "kept").managed is False


def test_a_move_back_to_one_gpu_regains_the_micro_batch_first_asked_for(capsys, bucket, root, fake):
    from model.config import load_spec

    named = ("--override", "train.activation_checkpointing=none")  # a level named: the micro-batch is kept
    start(capsys, bucket, root, "there-and-back", *named, gpu="H100:8")  # 16 sequences over 8 GPUs: micro 2
    assert load_spec(root / "there-and-back" / runs.CONFIG).train.micro_batch_size == 2
    fake.script(ManagedJobStatus.CANCELLED)
    code, out, err = lmctl(capsys, "resume", "there-and-back", "--gpu", "RTX4090", "--runs-dir", str(root))
    assert code == 0, err
    spec = load_spec(root / "there-and-back" / runs.CONFIG)
    assert spec.train.micro_batch_size == 8 and spec.grad_accum_steps(1) == 2  # tiny asks for 8
    assert runs.read_record(root / "there-and-back").workers == 1

    start(capsys, bucket, root, "auto-there-and-back", gpu="H100:8")  # auto: the plan chooses every time
    fake.script(ManagedJobStatus.CANCELLED)
    code, out, err = lmctl(
        capsys, "resume", "auto-there-and-back", "--gpu", "RTX4090", "--runs-dir", str(root)
    )
    assert code == 0, err
    spec = load_spec(root / "auto-there-and-back" / runs.CONFIG)
    assert (spec.train.activation_checkpointing, spec.train.micro_batch_size) == ("none", 16)  # all at once
