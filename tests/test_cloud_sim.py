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


@pytest.mark.parametrize("gpu, nodes", [("L40S:2", 1), ("L40S", 2)], ids=["1-node", "2-node"])
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
