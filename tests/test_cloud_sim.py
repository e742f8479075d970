"""Cloud runs without a cloud: the task lmctl hands SkyPilot, executed for real on a simulated cluster.

`lmctl launch --gpu ...` runs unchanged up to SkyPilot's SDK (data staged into a real S3 server on
loopback, config.yaml put beside the checkpoints); `sky.jobs.launch` is the one function replaced, and it
keeps the sky.Task it is given. tests/skysim.py then runs that task's own `setup` and `run` scripts as the
nodes of a 1-node and a 2-node cluster (SKYPILOT_* set, two Ray nodes on this machine, CPU workers). A
preemption is a SIGKILL of every node; SkyPilot's recovery is the same scripts on fresh nodes, which know
only the task's envs and secrets.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from skysim import SimCluster, bare_env, wait_until

from model.checkpoint import Checkpointer
from model.store import open_store
from orchestrator import runs
from orchestrator.launch import Hardware, launch

pytestmark = pytest.mark.slow


def overrides(steps: int, every: int) -> list[str]:
    return [
        f"train.steps={steps}",
        "train.log_every=5",
        f"train.eval_every={every}",
        f"train.checkpoint_every={every}",
        "train.eval_batches=2",
    ]


@pytest.fixture
def sky_jobs(monkeypatch, s3_bucket):
    """SkyPilot's SDK at its boundary: jobs.launch keeps the task; no API server can start."""
    import sky

    monkeypatch.setenv("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)  # rendered into the task's envs
    monkeypatch.setenv("WANDB_API_KEY", "sim-wandb-canary")
    submitted: list = []

    def jobs_launch(task, name=None, **kwargs):
        submitted.append((name, task))
        return f"request-{len(submitted)}"

    monkeypatch.setattr(sky.jobs, "launch", jobs_launch)
    monkeypatch.setattr(sky, "stream_and_get", lambda request: ([int(request.split("-")[1])], None))
    return submitted


def launch_cloud(tmp_path: Path, bucket, name: str, gpu: str, nodes: int, steps: int, every: int):
    launched = launch(
        "tiny",
        overrides(steps, every),
        name=name,
        store=bucket.uri,
        root=tmp_path / "runs",
        hardware=Hardware(gpu=gpu, nodes=nodes, cloud="aws"),
    )
    return launched


def sim_env(bucket) -> dict[str, str]:
    return bare_env(dict(os.environ)) | {"LMCTL_STORE_POLL_S": "1", "OMP_NUM_THREADS": "1"}


def bucket_metrics(bucket, name: str) -> list[dict]:
    text = open_store(bucket.uri, bucket.endpoint).get_bytes(runs.store_key(name, runs.METRICS)).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def hub_repo(tmp_path: Path, files: int = 6) -> Path:
    """A hub dataset `sim/corpus` of `files` parquet files of corpus paragraphs, ~2.5K tokens each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model.config import DEFAULT_CORPUS
    from model.shards import read_jsonl_texts

    repo = tmp_path / "hub" / "sim" / "corpus" / "data"
    repo.mkdir(parents=True)
    paragraphs = [p for d in read_jsonl_texts(DEFAULT_CORPUS) for p in d.split("\n\n") if p.strip()]
    for k in range(files):
        part = paragraphs[k * 60 : (k + 1) * 60]
        pq.write_table(pa.table({"text": part}), repo / f"train-{k:05d}-of-{files:05d}.parquet")
    return tmp_path / "hub"


@pytest.mark.parametrize("gpu, nodes", [("L40S", 2)], ids=["2-node"])  # 1 node: the spot test below
def test_a_cloud_run_trains_into_the_bucket_and_survives_a_preemption(
    tmp_path, s3_bucket, sky_jobs, gpu, nodes
):
    name = f"sim{nodes}"
    launched = launch_cloud(tmp_path, s3_bucket, name, gpu, nodes=nodes, steps=120, every=20)
    [(job_name, task)] = sky_jobs
    assert job_name == name and launched.record.job_id == 1 and launched.record.state == "starting"
    assert task.num_nodes == nodes and launched.record.workers == 2
    assert task.secrets["WANDB_API_KEY"].get_secret_value() == "sim-wandb-canary"
    assert task.secrets["AWS_SECRET_ACCESS_KEY"].get_secret_value()  # the pods' only way into the bucket
    assert "sim-wandb-canary" not in (launched.path / runs.TASK).read_text()
    ckpts = Checkpointer(launched.record.checkpoints)

    (tmp_path / "sim").mkdir()
    sim = SimCluster(task, tmp_path / "sim", sim_env(s3_bucket))
    setup = sim.setup()
    assert setup.returncode == 0, setup.stdout + setup.stderr
    try:
        sim.start()
        alive = lambda: sim.procs[0].poll() is None
        wait_until(lambda: (ckpts.latest() or 0) >= 40, 300, "a checkpoint at step 40", alive=alive)
        sim.preempt()
        killed_at = ckpts.latest()
        first_log = sim.log(0)
        assert f"{nodes} node{'s' * (nodes > 1)} in the Ray cluster" in first_log, first_log
        assert "starting 2 CPU workers" in first_log, first_log
        assert killed_at < 120, "the run finished before the preemption; make it longer"
        before = [r["step"] for r in bucket_metrics(s3_bucket, name) if "val_loss" in r]
        assert 20 in before  # metrics reach the bucket while the run trains

        sim.start()  # SkyPilot's recovery: the same task on new nodes that know only its envs and secrets
        assert sim.wait_head(timeout=300) == 0, sim.log(0)
    finally:
        sim.kill()
    log = sim.log(0)
    resumed = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", log)]
    assert resumed and resumed[0] >= killed_at, log
    assert "finished: finished at step 120" in log, log
    assert ckpts.latest() == 120
    assert open_store(s3_bucket.uri, s3_bucket.endpoint).exists(
        f"runs/{name}/checkpoints/step_000000120/COMMIT"
    )

    metrics = bucket_metrics(s3_bucket, name)
    # One history, exactly a never-preempted run's, whichever node rank 0 was on before and after the
    # recovery (each node has its own disk): nothing lost, nothing redone logged twice.
    assert [r["step"] for r in metrics if "loss" in r] == list(range(5, 121, 5))
    assert [r["step"] for r in metrics if "val_loss" in r] == list(range(20, 121, 20))


def test_pods_rented_with_gpus_that_ray_cannot_see_fail_instead_of_training_on_cpus(
    tmp_path, s3_bucket, sky_jobs
):
    """A GPU image with no working CUDA driver: the run fails in one line before a step, not slowly on CPU."""
    launch_cloud(tmp_path, s3_bucket, "nocuda", "L40S", nodes=1, steps=20, every=10)
    [(_, task)] = sky_jobs
    (tmp_path / "sim").mkdir()
    sim = SimCluster(task, tmp_path / "sim", sim_env(s3_bucket), gpus_per_node=1)
    assert sim.setup().returncode == 0
    try:
        sim.start()
        code = sim.wait_head(timeout=300)
    finally:
        sim.kill()
    log = sim.log(0)
    assert code != 0, log
    assert "the pods were rented with 1 GPU(s) each but Ray sees 0 GPUs for 1 workers" in log, log
    assert "starting 1 CPU workers" not in log and "Traceback" not in log
    assert Checkpointer(f"{s3_bucket.uri}/runs/nocuda/checkpoints").latest() is None


def test_a_hub_dataset_is_staged_by_the_run_s_nodes_and_survives_losing_one(
    tmp_path, s3_bucket, sky_jobs, monkeypatch
):
    """The launching machine reads no dataset bytes and uploads no shard: both nodes of the run stage the
    hub dataset as Ray tasks, one of them dies after its first unit (its tasks rerun on the other), and the
    committed dataset is byte for byte what one machine stages; the recovered job reuses it and trains."""
    from hubsim import FakeHub, use_endpoint

    from model.config import load_spec
    from model.store import S3Store
    from orchestrator.stage import stage

    puts: list[str] = []  # every key this process (the launcher) writes to the bucket
    real_file, real_bytes = S3Store.put_file, S3Store.put_bytes
    monkeypatch.setattr(
        S3Store,
        "put_file",
        lambda self, local, key, **kw: puts.append(key) or real_file(self, local, key, **kw),
    )
    monkeypatch.setattr(
        S3Store, "put_bytes", lambda self, key, data: puts.append(key) or real_bytes(self, key, data)
    )

    hub = FakeHub(hub_repo(tmp_path))
    with hub as endpoint, use_endpoint(endpoint, home=tmp_path / "hf-launcher"):
        launched = launch(
            "tiny",
            [*overrides(20, 10), "data.dataset=sim/corpus"],
            name="hubrun",
            store=s3_bucket.uri,
            root=tmp_path / "runs",
            hardware=Hardware(gpu="L40S", nodes=2, cloud="aws"),
        )
        assert hub.reads == [] and hub.bytes_served == 0  # the revision was resolved; no file was read
        assert not [k for k in puts if k.startswith("datasets/")], puts  # no shard, no tokenizer
        spec = load_spec(launched.path / runs.CONFIG)
        assert spec.data.revision == hub.sha("sim/corpus") and spec.data.path is None
        assert launched.record.data is None
        [(_, task)] = sky_jobs
        assert task.envs["HF_ENDPOINT"] == endpoint

        (tmp_path / "sim").mkdir()
        env = sim_env(s3_bucket) | {"HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
        env |= {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}
        sim = SimCluster(task, tmp_path / "sim", {k: v for k, v in env.items() if not k.endswith("_OFFLINE")})
        assert sim.setup().returncode == 0
        bucket = open_store(s3_bucket.uri, s3_bucket.endpoint)
        try:
            # node 1 dies half way through its second unit: after its train shard, before its val shard
            sim.node_extra = {1: {"LMCTL_FAULT": "stage.after_shard:3:SESSION"}}
            sim.start()
            alive = lambda: sim.procs[0].poll() is None
            committed = lambda: any(k.endswith("/manifest.json") for k in bucket.list("datasets"))
            wait_until(committed, 240, "the dataset committed by the surviving node", alive=alive)
            wait_until(
                lambda: "units on 2 nodes" in sim.log(0), 30, "the staging's line in the log", alive=alive
            )
            first = sim.log(0)
            sim.preempt()  # the job lost a node: SkyPilot recovers it on new nodes
            sim.node_extra = {}
            sim.start()
            assert sim.wait_head(timeout=300) == 0, sim.log(0)
        finally:
            sim.kill()
        assert "6 units on 2 nodes" in first and "so the task will be retried" in first, first
        log = sim.log(0)
        assert "reused" in log and "finished: finished at step 20" in log, log

        # one machine, this process, the same config: the same bytes
        (prefix,) = {k.rsplit("/", 1)[0] for k in bucket.list("datasets") if k.endswith("/manifest.json")}
        here = stage(spec.data, f"file://{tmp_path / 'here'}", vocab_size=spec.model.vocab_size)
    assert prefix == f"datasets/{here.content_hash}" and here.units == 6
    local = open_store(f"file://{tmp_path / 'here'}")
    ours = {k: local.get_bytes(k) for k in local.list(prefix)}
    theirs = {k: bucket.get_bytes(k) for k in bucket.list(prefix)}
    for objects in (ours, theirs):  # stage.json says how long it took: the one object that may differ
        info = json.loads(objects.pop(f"{prefix}/stage.json"))
        objects["seconds"] = info.pop("seconds") > 0
        objects["stage.json"] = json.dumps(info).encode()
    assert ours == theirs


def test_lmctl_stage_cloud_is_a_cpu_job_that_resumes_after_a_preemption(
    tmp_path, s3_bucket, sky_jobs, capsys
):
    """`lmctl stage --cloud` pins the revision and submits a 2-node CPU job (SkyPilot's schema); the job's
    head dies after its first unit, the rerun stages only the units not recorded, and the committed dataset
    is at the URI the submit named, byte for byte what one machine stages; asked again, nothing is
    submitted."""
    from hubsim import FakeHub, use_endpoint

    from model.config import DataConfig
    from orchestrator.cli import main
    from orchestrator.stage import stage

    hub = FakeHub(hub_repo(tmp_path))
    argv = ["stage", "--dataset", "sim/corpus", "--store", s3_bucket.uri, "--vocab-size", "512"]
    argv += ["--cloud", "--cpus", "2", "--nodes", "2", "--json"]
    bucket = open_store(s3_bucket.uri, s3_bucket.endpoint)
    with hub as endpoint, use_endpoint(endpoint, home=tmp_path / "hf-launcher"):
        assert main(argv) == 0
        out = json.loads(capsys.readouterr().out)
        assert hub.reads == [] and bucket.list("datasets") == []  # nothing read, nothing staged from here
        assert out["revision"] == hub.sha("sim/corpus") and not out["reused"] and out["job_id"] == 1
        [(name, task)] = sky_jobs
        assert name == out["name"] and task.num_nodes == 2
        assert {str(r.cpus) for r in task.resources} == {"2+"} and not any(
            r.accelerators for r in task.resources
        )
        assert task.secrets["AWS_SECRET_ACCESS_KEY"].get_secret_value()

        (tmp_path / "sim").mkdir()
        env = sim_env(s3_bucket) | {"HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
        sim = SimCluster(task, tmp_path / "sim", {k: v for k, v in env.items() if not k.endswith("_OFFLINE")})
        assert sim.setup().returncode == 0
        try:
            sim.node_extra = {0: {"LMCTL_FAULT": "stage.after_unit:1:SESSION"}}  # the head node is lost
            sim.start()
            assert sim.wait_head(timeout=300) != 0
            sim.preempt()
            recorded = [k for k in bucket.list("datasets") if "/units/" in k]
            assert recorded and not any(k.endswith("manifest.json") for k in bucket.list("datasets"))
            sim.node_extra = {}
            sim.start()  # SkyPilot's recovery of the managed job
            assert sim.wait_head(timeout=300) == 0, sim.log(0)
        finally:
            sim.kill()
        result = json.loads(sim.log(0).strip().splitlines()[-1])
        assert result["dataset_uri"] == out["dataset_uri"] and result["tokens"] > 0
        again = [u for u in result["uploaded"] if u.startswith("units/")]
        assert len(again) == 6 - len(recorded) and "tokenizer.json" not in result["uploaded"]

        here = stage(
            DataConfig(dataset="sim/corpus", revision=out["revision"]),
            f"file://{tmp_path / 'here'}",
            vocab_size=512,
        )
        assert main(argv) == 0 and json.loads(capsys.readouterr().out)["reused"]
        assert len(sky_jobs) == 1
    prefix = f"datasets/{here.content_hash}"
    assert out["dataset_uri"].endswith(prefix)
    local = open_store(f"file://{tmp_path / 'here'}")
    ours = {k: local.get_bytes(k) for k in local.list(prefix) if not k.endswith("stage.json")}
    theirs = {k: bucket.get_bytes(k) for k in bucket.list(prefix) if not k.endswith("stage.json")}
    assert ours == theirs and len(ours) == 1 + 6 + 12 + 1  # tokenizer, unit records, shards, manifest


def test_a_spot_run_preempted_twice_accounts_for_every_second(tmp_path, s3_bucket, sky_jobs, monkeypatch):
    """A 1-node spot run preempted twice, each time right after a step reached the store: the accounting
    (from its timeline, brought by the same refresh as status) counts 2 automatic recoveries, the steps
    redone as the test caused them, recovery time at least the test's own wait for new nodes, and states
    that add up to the job's wall time; the report says the same."""
    import time

    from model.timeline import TIMELINE
    from orchestrator import accounting, backends, cloud

    launched = launch(
        "tiny",
        [*overrides(120, 20), "train.evals=[]", "train.samples=[]"],
        name="spot2",
        store=s3_bucket.uri,
        root=tmp_path / "runs",
        hardware=Hardware(gpu="L40S:2", nodes=1, cloud="aws", spot=True),
    )
    [(_, task)] = sky_jobs
    [[submitted, ended]] = launched.record.segments
    assert ended is None and launched.record.price_per_hour > 0

    (tmp_path / "sim").mkdir()
    env = sim_env(s3_bucket) | {"LMCTL_STORE_POLL_S": "0"}  # every log step reaches the store at once
    sim = SimCluster(task, tmp_path / "sim", env)
    assert sim.setup().returncode == 0
    waits, resumed = [], []
    try:
        # 1st launch: lost after step 30 is logged (6th log); 2nd: after its 5th log
        for logs in (6, 5, None):
            sim.node_extra = {0: {"LMCTL_FAULT": f"train.logged:{logs}:SESSION"}} if logs else {}
            restarted = time.time()
            if waits:
                waits[-1] = restarted - waits[-1]  # how long the test kept the job without nodes
            sim.start()
            code = sim.wait_head(timeout=300)
            log = sim.log(0)
            resumed += [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", log)]
            if logs:
                assert code != 0, log
                sim.preempt()  # whatever the session kill left
                waits.append(time.time())
        assert code == 0, log
        finished = time.time()
    finally:
        sim.kill()
    assert "finished: finished at step 120" in log, log
    assert len(resumed) == 2, resumed
    assert task.num_nodes == 1 and launched.record.workers == 2 and "starting 2 CPU workers" in log
    metrics = bucket_metrics(s3_bucket, "spot2")  # one history, as if never preempted
    assert [r["step"] for r in metrics if "loss" in r] == list(range(5, 121, 5))
    assert [r["step"] for r in metrics if "val_loss" in r] == list(range(20, 121, 20))

    # SkyPilot's side at its boundary: the job ended when the head exited
    monkeypatch.setattr(
        cloud, "job_info", lambda record: cloud.JobInfo("finished", "SUCCEEDED", ended_at=finished)
    )
    record = backends.of(launched.record).refresh(launched.path)
    assert record.state == "finished" and (launched.path / TIMELINE).exists()
    acc = accounting.of_run(launched.path)

    last_steps = [30, resumed[0] + 5 * 5]  # the step each lost launch was last heard at
    assert [r.last_step for r in acc.recoveries] == last_steps
    assert [r.resumed_step for r in acc.recoveries] == resumed
    assert [r.redone_steps for r in acc.recoveries] == [
        s - r for s, r in zip(last_steps, resumed, strict=True)
    ]
    assert all(r.automatic for r in acc.recoveries)
    for r, waited in zip(acc.recoveries, waits, strict=True):
        assert r.recovery_s >= waited  # the nodes' absence, then setup, Ray, data and the checkpoint load
        assert r.nodes_s >= waited and r.data_s > 0 and r.restore_s > 0  # each part measured
        assert r.nodes_s + r.staging_s + r.data_s + r.restore_s <= r.recovery_s
        assert 0 < r.redone_s < r.heard - submitted
    assert acc.lost_s == sum(r.recovery_s + r.redone_s for r in acc.recoveries)

    # every second of the job, by state, adds up to its wall time
    assert acc.wall_s == pytest.approx(finished - submitted, abs=0.01)  # run.json keeps milliseconds
    assert abs(acc.unaccounted_s) <= 0.01 * acc.wall_s
    s = acc.seconds
    assert abs(sum(s.values()) - acc.wall_s) <= 0.01 * acc.wall_s
    assert s["training"] > 0 and s["evaluating"] > 0 and s["checkpointing"] > 0 and s["idle"] >= 0
    assert s["recovering"] + s["staging"] >= sum(waits)
    assert acc.tokens == 120 * load_spec_tokens(launched.path) and acc.step == 120
    assert acc.cost == record.price_per_hour * acc.wall_s / 3600
    assert acc.lost_cost == record.price_per_hour * acc.lost_s / 3600

    # the report says the same: 2 recoveries, the steps redone, the time and money lost, each labelled
    from orchestrator.report import report_json, write_report

    folder = write_report(launched.path)
    reported = report_json(folder)
    assert [(r["resumed_step"], r["redone_steps"]) for r in reported["recoveries"]] == [
        (r.resumed_step, r.redone_steps) for r in acc.recoveries
    ]
    assert reported["lost_s"] == pytest.approx(acc.lost_s) and reported["cost"] == pytest.approx(acc.cost)
    text = (folder / "report.md").read_text()
    assert "assumed" in text and all((folder / f).stat().st_size > 10_000 for f in ("cost.png", "loss.png"))


def load_spec_tokens(path: Path) -> int:
    from model.config import load_spec

    return load_spec(path / runs.CONFIG).train.global_batch_tokens
