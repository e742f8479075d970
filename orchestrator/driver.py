"""The driver of one run: stage the data, start Ray, run the training loop in a TorchTrainer, record the end.

    python -m orchestrator.driver runs/<name>            # what `lmctl launch --mode local` starts, detached
    python -m orchestrator.driver --pod <name> --store s3://… --address HOST:6379 --workers N --nodes K
                                                         # on a cloud head node (tasks/train.yaml's run)

Same code path locally and in the cloud. The workers resume from the run's newest committed checkpoint
in the store by themselves, so a worker restarted by Ray's FailureConfig, a driver restarted by
`lmctl resume` and a pod recovered by SkyPilot all take one path.

On a pod the run directory is rebuilt from the store (config.yaml here; rank 0 of the workers fetches
metrics.jsonl so far on whichever node it lands): a pod that SkyPilot recovered after a preemption is a new
machine that knows only the run's name and store, and nodes share no disk.

Stopping: a runs.StopRequest in the store asks every worker to checkpoint and stop at the end of the step
it is in; `lmctl stop` asks, and so does SIGTERM or Ctrl-C to the driver.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from model.config import ConfigError, RunSpec, load_spec
from model.state import outcome
from model.store import StoreError, open_store
from orchestrator import runs
from orchestrator.runs import say
from orchestrator.stage import StageError, stage_for_run
from orchestrator.stage_unit import RayUnits
from orchestrator.worker import train_worker

MAX_WORKER_FAILURES = 3
NODES_TIMEOUT_S = 600  # how long the head waits for the other nodes to join its Ray cluster

# The environment of Ray's processes (the controller and the workers), set alike for a local cluster (which
# inherits this process's environment) and a cloud one (passed as the job's runtime_env).
RAY_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # worker prints once, not twice
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # Ray Train's poll period: report() waits about this long
    "RAY_USAGE_STATS_ENABLED": "0",
    # Two actors fewer to start (~2 s on 2 cores): recovery from preemption is our checkpoints' job (and
    # SkyPilot's), and nothing reads Ray Train's Prometheus metrics.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


class ClusterError(RuntimeError):
    """The Ray cluster did not form (a node never joined): the machines' fault, not the config's or data's."""


def start_ray(workers: int, address: str | None, nodes: int = 1) -> None:
    """Join a cluster (cloud) or start a small one here; workers inherit this process's environment."""
    cpus = os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus // max(1, workers))))
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file in $HOME for a local run
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    import ray

    if address:
        env = {k: os.environ[k] for k in RAY_ENV}
        ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": env})
        wait_for_nodes(nodes)
    else:
        ray.init(
            address="local",  # our own instance, even where another Ray cluster runs (or RAY_ADDRESS is set)
            num_cpus=max(workers, 1),
            include_dashboard=False,
            object_store_memory=100 * 1024**2,
            logging_level=logging.WARNING,
            log_to_driver=False,  # workers write the run's log themselves, without Ray's chatter
        )


def wait_for_nodes(nodes: int) -> None:
    """The head starts training only once every node has joined: Ray Train would otherwise wait for the
    missing GPUs without saying why."""
    import ray

    deadline = time.monotonic() + NODES_TIMEOUT_S
    while (alive := sum(n["Alive"] for n in ray.nodes())) < nodes:
        if time.monotonic() > deadline:
            raise ClusterError(f"only {alive} of {nodes} nodes joined the Ray cluster in {NODES_TIMEOUT_S} s")
        time.sleep(1)
    say(f"{nodes} node{'s' * (nodes > 1)} in the Ray cluster")


def pod_run_dir(name: str, store: str, workers: int) -> Path:
    """On a cloud head node: runs/<name>/ rebuilt from the store, which is all a recovered pod has."""
    path = runs.runs_root() / runs.check_name(name)
    (path / "logs").mkdir(parents=True, exist_ok=True)
    open_store(store).get_file(runs.store_key(name, runs.CONFIG), path / runs.CONFIG)  # metrics: rank 0's
    spec = load_spec(path / runs.CONFIG)
    if (path / runs.RUN_RECORD).exists():
        runs.update_record(path, workers=workers)  # a rerun on the same node
    else:
        runs.write_record(path, runs.new_record(name, "cloud", "staging", name, store, workers, spec))
    return path


def fit(
    spec: RunSpec, record: runs.RunRecord, path: Path, use_gpu: bool, pod: bool, launch: dict
) -> str | None:
    """Run the TorchTrainer to the end; the cause's one line when it failed: at once for an error that a
    retry would repeat, after MAX_WORKER_FAILURES restarts otherwise (orchestrator/failures.py)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError

    from orchestrator.failures import failure_message, trainer

    run = trainer(
        train_loop_per_worker=train_worker,
        train_loop_config={
            "spec": spec,  # the validated spec itself (Ray pickles it), not a dict to validate again
            "run_dir": str(path),  # a local run's; on a pod every node has its own (runs_root()/name)
            "name": record.name,
            "checkpoints": record.checkpoints,
            "device": "cuda" if use_gpu else "cpu",
            "store": record.store,  # where rank 0 looks for STOP (runs.StopRequest)
            # On a pod rank 0 may be on another node: it logs through Ray (to SkyPilot's log) and mirrors
            # metrics.jsonl to the store.
            "pod": pod,
            "launch": launch,  # when this launch began and how long it staged: the run's timeline
        },
        scaling_config=ScalingConfig(
            num_workers=record.workers,
            use_gpu=use_gpu,
            resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1},
        ),
        run_config=RunConfig(
            name=record.name,
            storage_path=str(path / "ray"),
            failure_config=FailureConfig(max_failures=MAX_WORKER_FAILURES),
            logging_config=LoggingConfig(log_level="ERROR"),  # its INFO lines would drown ours
        ),
    )
    try:
        run.fit()
    except TrainingFailedError as e:
        return failure_message(e)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestrator.driver", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?", help="the run directory lmctl rendered (config.yaml, run.json)")
    ap.add_argument("--pod", metavar="RUN", help="on a cloud head node: rebuild runs/RUN from --store")
    ap.add_argument("--store", help="the run's store URI (with --pod)")
    ap.add_argument("--address", help="Ray cluster to join (default: start one on this machine)")
    ap.add_argument("--workers", type=int, help="Ray Train workers (with --pod: nodes x GPUs per node)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes to wait for in the Ray cluster")
    args = ap.parse_args(argv)
    began = time.time()  # this launch's time starts here (orchestrator/accounting.py)
    os.umask(0o077)  # run state, checkpoints, Ray's and wandb's files: the owner's alone (Ray inherits it)
    if bool(args.pod) == bool(args.run_dir) or (args.pod and not (args.store and args.workers)):
        ap.error("give a run directory, or --pod RUN with --store and --workers")
    path = pod_run_dir(args.pod, args.store, args.workers) if args.pod else Path(args.run_dir).resolve()

    record = runs.read_record(path)
    stop = runs.StopRequest(record.store, record.name)

    def ask_stop(signum, frame) -> None:
        stop.ask()
        runs.update_record(path, state="stopping")
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts

    record = runs.update_record(
        path,
        driver=runs.Process.of(os.getpid()).__dict__,
        session=os.getsid(0),
        state=record.state if record.state in runs.ACTIVE else "staging",  # started by hand (cloud head)
    )
    signal.signal(signal.SIGTERM, ask_stop)
    signal.signal(signal.SIGINT, ask_stop)
    code, state, message = 1, "failed", None
    try:
        spec = load_spec(path / runs.CONFIG)
        with ThreadPoolExecutor(
            1
        ) as pool:  # a local run's staging (CPU) overlaps Ray's start (mostly waiting)
            staged = None if args.pod else pool.submit(timed(stage_for_run), spec, record, path)
            t0 = time.perf_counter()
            start_ray(record.workers, args.address, args.nodes)
            signal.signal(signal.SIGTERM, ask_stop)  # ray.init installs its own handlers
            signal.signal(signal.SIGINT, ask_stop)
            import ray

            gpus = ray.cluster_resources().get("GPU", 0)
            use_gpu = gpus >= record.workers
            asked = int(os.environ.get("SKYPILOT_NUM_GPUS_PER_NODE") or 0)  # 0: a CPU task, CPU workers
            if args.pod and asked and not use_gpu:  # GPUs rented but unseen: CPU training burns the budget
                raise ConfigError(
                    f"the pods were rented with {asked} GPU(s) each but Ray sees {gpus:g} GPUs for "
                    f"{record.workers} workers (no CUDA driver in the image?); not training on CPUs"
                )
            say(f"Ray up in {time.perf_counter() - t0:.1f} s")
            # On a pod, every node of the cluster stages the data before it trains: one Ray task per unit
            spec, staging_s = (
                staged.result() if staged else timed(stage_for_run)(spec, record, path, runner=RayUnits())
            )
            record = runs.update_record(path, data=spec.data.path)
        say(f"starting {record.workers} {'GPU' if use_gpu else 'CPU'} workers")
        if not stop.asked():
            runs.update_record(path, state="running")
        launch = {"began": began, "staging_s": staging_s}
        message = fit(spec, record, path, use_gpu, pod=bool(args.pod), launch=launch)
        if message is None:
            state, step = outcome(record.checkpoints, spec.train.steps)
            code, message = 0, f"{state} at step {step}"
    except (ConfigError, StoreError, StageError, ClusterError) as e:
        message = str(e)
    except Exception as e:  # noqa: BLE001 - the record must say why the run ended
        message = f"{type(e).__name__}: {e}".splitlines()[0]
        raise
    finally:
        say(f"{state}: {message}")
        record = runs.read_record(path)
        ended = runs.segments_ended(record)
        runs.update_record(path, state=state, exit_code=code, message=message, segments=ended)
        _shutdown(keep_cluster=bool(args.address))
    return code


def timed(fn):
    """fn, returning (its result, the seconds it took)."""

    def run(*args, **kwargs):
        t0 = time.perf_counter()
        return fn(*args, **kwargs), time.perf_counter() - t0

    return run


def _shutdown(keep_cluster: bool) -> None:
    """Stop Ray and anything it left in this run's session (its agents outlive a killed driver); a cluster
    we joined (cloud) is left to whoever started it."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
    if not keep_cluster and os.getsid(0) == os.getpid():  # we lead our own session (started detached)
        runs.kill_session(os.getpid())


if __name__ == "__main__":
    sys.exit(main())
