"""Launch, resume and stop runs. Each is one function a notebook could call; the CLI is a thin layer.

launch: validate everything first (nothing is written for bad input), render runs/<name>/, then start it
  on its backend (orchestrator/backends.py: the driver detached here, or a SkyPilot job).
resume: start it again; the workers continue from the newest committed checkpoint in the store, with the
  same data order. A cloud run may move to other GPUs (same global batch).
stop: ask the workers to checkpoint and stop (runs.StopRequest, in the store), wait, then end whatever is
  left (the backend cancels it).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.config import (
    CONFIGS_DIR,
    ConfigError,
    RunSpec,
    apply_overrides,
    load_preset,
    load_spec,
    parse_override,
    validate,
)
from model.hardware import DEFAULT_MFU
from model.shards import atomic_write
from orchestrator import backends, runs
from orchestrator.preemption import Assumptions
from orchestrator.render import render_task
from orchestrator.sanity import warn_before_launch

DISK_GB = 128  # per node: data cache, checkpoint staging, the venv; SkyPilot's default (256) is billed
JOB_RECOVERY = {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 2}  # managed jobs


@dataclass
class Hardware:
    """What a cloud run rents: `--gpu`, `--nodes`, `--cloud`, `--spot` and friends."""

    gpu: str
    nodes: int = 1
    cloud: str | None = None
    spot: bool = False
    managed: bool = True
    disk_size: int = DISK_GB
    image: str | None = None
    price: float | None = None  # USD per GPU-hour; None: configs/pricing/prices.yaml
    mfu: float = DEFAULT_MFU
    assume: Assumptions = field(default_factory=Assumptions)  # in place of configs/pricing/preemption.yaml


@dataclass
class CloudPlan:
    spec: RunSpec  # with the micro-batch the plan chose
    gpu: str  # the canonical --gpu (gpus.GpuRequest.text)
    workers: int
    resources: dict
    plan: object  # orchestrator.plan.Plan


@dataclass
class Launched:
    name: str
    path: Path
    record: runs.RunRecord
    spec: RunSpec


def resolve_spec(
    preset: str, overrides: list[str], wandb: bool = False, mixture: list[dict] | None = None
) -> RunSpec:
    """Preset + overrides (+ --wandb, + the sources of a mixture) -> one validated spec. An explicit
    `train.checkpoint_every: auto` gets this machine's interruption rate and checkpoint cost where it gives
    none (with_local_interval); a cloud launch replaces them with its plan's (with_planned_interval)."""
    raw = apply_overrides(load_preset(preset), [*overrides, *(["wandb.enabled=true"] if wandb else [])])
    spec = with_local_interval(raw)
    if not mixture:
        return spec
    return validate({**spec.model_dump(), "data": {**spec.data.model_dump(), "mixture": mixture}})


def with_local_interval(raw: dict) -> RunSpec:
    """`raw` validated; with checkpoint_every=auto, what the user left out of Young/Daly's inputs is filled
    in as for a local run: on-demand failures of this machine's GPUs (a CPU counts as one GPU) and the state's
    size over the assumed store bandwidth (configs/pricing/preemption.yaml)."""
    train = raw.get("train")
    if not (isinstance(train, dict) and train.get("checkpoint_every") == "auto"):
        return validate(raw)
    from orchestrator import preemption
    from orchestrator.sanity import local_gpu_names

    rate_given, cost_given = train.get("mtbf_hours") is not None, train.get("checkpoint_cost_s") is not None
    if rate_given and cost_given:
        return validate(raw)
    spec = validate({**raw, "train": {**train, "mtbf_hours": train.get("mtbf_hours") or 1.0}})  # the shape
    mtbf_hours, cost_s = preemption.local_auto(spec.model, len(local_gpu_names()))
    filled = {"mtbf_hours": _rounded(mtbf_hours)} if not rate_given else {}
    filled |= {"checkpoint_cost_s": _rounded(cost_s)} if not cost_given else {}
    return validate({**raw, "train": {**train, **filled}})


def _rounded(x: float) -> float:
    """4 significant digits: what config.yaml shows of an estimate."""
    return float(f"{x:.4g}")


def chosen_train_keys(preset: str, overrides: list[str]) -> set[str]:
    """The train.* keys the user chose: by --override, or in a config file of their own. A shipped preset's
    numbers (configs/*.yaml) are defaults, not choices."""
    keys = {key.partition(".")[2] for key, _ in map(parse_override, overrides) if key.startswith("train.")}
    path = Path(preset)
    own_file = path.suffix in (".yaml", ".yml") and _present(preset, file=True)
    if own_file and path.resolve().parent != CONFIGS_DIR.resolve():
        train = load_preset(preset).get("train")
        keys |= {str(k) for k in train} if isinstance(train, dict) else set()
    return keys


def with_planned_interval(spec: RunSpec, plan, chosen: set[str]) -> RunSpec:
    """A cloud run checkpoints at Young/Daly's interval (train.checkpoint_every: auto) from its plan's MTBF
    and checkpoint cost estimate: each of those three settings unless `chosen` (the user's own) holds it; a
    number of steps chosen stays as it is."""
    if "checkpoint_every" in chosen and spec.train.checkpoint_every != "auto":
        return spec
    p = plan.preemption
    planned = {
        "checkpoint_every": "auto",
        "mtbf_hours": _rounded(p.mtbf_hours),
        "checkpoint_cost_s": _rounded(p.checkpoint_cost_s),
    }
    return spec.with_train(**{k: v for k, v in planned.items() if k not in chosen})


def dataset_flags(datasets: list[str]) -> tuple[list[str], list[dict] | None]:
    """`--dataset NAME[:WEIGHT]`, given once or more: (overrides, mixture sources). Once, it is data.dataset
    or data.path (dataset_override); twice or more, the sources of data.mixture, weight 1 where none is
    given. A staged dataset (store URI, folder with manifest.json) is a source that is not staged again."""
    parsed = []
    for text in datasets:
        name, _, tail = text.rpartition(":")
        try:
            weight = float(tail) if name else None
        except ValueError:
            if len(datasets) > 1 and "://" not in tail and "/" not in tail:
                raise ConfigError(
                    f"--dataset {text}: the weight after ':' must be a number, e.g. {name}:0.3"
                ) from None
            weight = None
        parsed.append((name, weight) if weight is not None else (text, None))
    if len(parsed) == 1:
        if parsed[0][1] is not None:
            raise ConfigError(
                f"--dataset {datasets[0]}: a weight mixes datasets; give --dataset twice or more"
            )
        return [dataset_override(datasets[0])], None
    return [], [
        {
            "dataset": name,
            "weight": 1.0 if weight is None else weight,
            "path": name if is_staged(name) else None,
        }
        for name, weight in parsed
    ]


def dataset_override(dataset: str) -> str:
    """`--dataset X` as an override: a staged dataset is trained on as it is (data.path); anything else is
    raw data to stage (data.dataset)."""
    return f"data.path={dataset}" if is_staged(dataset) else f"data.dataset={dataset}"


def is_staged(dataset: str) -> bool:
    """A store URI, or a folder holding manifest.json: a dataset already staged."""
    from model.shards import MANIFEST

    return "://" in dataset or (_present(dataset) and _present(str(Path(dataset) / MANIFEST), file=True))


def plan_cloud(spec: RunSpec, hw: Hardware, store: str, steps_left: int | None = None) -> CloudPlan:
    """Everything a cloud run needs checked before money is spent: the GPU and cloud, a store the pods
    reach, and a plan that fits. The plan's micro-batch replaces the config's when that one would not fit, and
    `activation_checkpointing: auto` becomes the level and micro-batch that train fastest on that GPU.
    Its time and cost are those of `steps_left` steps (default: all of train.steps)."""
    from orchestrator.gpus import check_combination, parse_gpu, sky_resources
    from orchestrator.plan import make_plan

    req = parse_gpu(hw.gpu)
    check_combination(req, hw.cloud, hw.nodes, hw.spot)
    if not store.startswith("s3://"):
        raise ConfigError(
            f"--store {store!r}: a cloud run needs a bucket that this machine and the pods both reach: "
            "--store s3://bucket/prefix (or $LMCTL_STORE)"
        )
    if not 10 <= hw.disk_size <= 65536:
        raise ConfigError(f"--disk-size {hw.disk_size}: give GB per node between 10 and 65536")
    steps = spec.train.steps if steps_left is None else max(1, steps_left)
    plan = make_plan(
        spec,
        req,
        hw.nodes,
        cloud=hw.cloud,
        spot=hw.spot,
        mfu=hw.mfu,
        price=hw.price,
        tokens=steps * spec.train.global_batch_tokens,
        assume=hw.assume,
    )
    if not plan.fits:
        raise ConfigError(f"the run does not fit: {plan.notes[-1] if plan.notes else 'see lmctl plan'}")
    chosen = {"micro_batch_size": plan.micro_batch, "activation_checkpointing": plan.checkpointing}
    if any(getattr(spec.train, k) != v for k, v in chosen.items()):
        spec = spec.with_train(**chosen)
    spec = _stage_what_it_trains_on(spec)
    resources = sky_resources(req, hw.cloud, hw.spot, hw.disk_size, hw.image, nodes=hw.nodes)
    if hw.managed:
        resources["job_recovery"] = dict(JOB_RECOVERY)
    workers = hw.nodes * req.count
    spec.grad_accum_steps(workers)
    return CloudPlan(spec, req.text(), workers, resources, plan)


def check_spending(plan, max_cost: float | None, confirm=None) -> None:
    """Before a cloud run rents anything: its planned cost is under `max_cost` (USD), then `confirm(plan)`
    (the CLI asks, or takes --yes) raises ConfigError unless the user agrees."""
    if max_cost is not None:
        if not (math.isfinite(max_cost) and max_cost >= 0):
            raise ConfigError(f"--max-cost {max_cost}: give a number of USD >= 0")
        if plan.cost is None:
            raise ConfigError(
                f"--max-cost {max_cost:g}: no price is known for {plan.gpu}"
                f"{' on ' + plan.cloud if plan.cloud else ''}; give --price USD per GPU-hour"
            )
        if plan.cost > max_cost:
            raise ConfigError(
                f"the planned cost ${plan.cost:,.2f} ({plan.world} x {plan.gpu} for {plan.hours:.1f} h at "
                f"{plan.mfu:.0%} MFU) is above --max-cost ${max_cost:,.2f}: train fewer steps, choose "
                "cheaper GPUs or raise --max-cost"
            )
    if confirm is not None:
        confirm(plan)


def _stage_what_it_trains_on(spec: RunSpec) -> RunSpec:
    """A hub dataset is staged up to the tokens the run trains on (plus the held-out share), not whole:
    fineweb-edu has over a trillion tokens. data.max_tokens set by hand wins. It caps each source of a
    mixture too: no source gives more than the whole run trains on."""
    from orchestrator.stage import looks_local

    d = spec.data
    sources = d.mixture or [d]
    if d.max_tokens or all(s.path or looks_local(s.dataset) for s in sources):
        return spec
    needed = math.ceil(spec.train.steps * spec.train.global_batch_tokens / (1 - d.val_fraction))
    data = d.model_copy(update={"max_tokens": needed})
    return RunSpec.model_validate({**spec.model_dump(), "data": data.model_dump()})


def _check_inputs(spec: RunSpec, workers: int, store: str) -> None:
    """Everything that can be checked before writing: batch split, data source, store URI."""
    from model.store import StoreError, open_store
    from orchestrator.stage import StageError, check_local_dataset, looks_local

    if not 1 <= workers <= 1024:
        raise ConfigError(f"--workers {workers}: must be between 1 and 1024")
    spec.grad_accum_steps(workers)
    from model.tasks import task_file

    for task in spec.train.evals:  # a known task or a file that exists: a typo fails here, not on a worker
        task_file(task)
    try:
        open_store(store)
    except (StoreError, ValueError) as e:
        raise ConfigError(f"--store {store!r}: {e}") from None
    if spec.data.path:
        from model.staged import staged_manifest

        try:
            manifest = staged_manifest(spec.data.path)
        except (StoreError, ValueError, OSError) as e:  # OSError: a name too long for the filesystem
            raise ConfigError(f"data.path {spec.data.path!r}: {e}") from None
        if manifest.vocab_size > spec.model.vocab_size:
            raise ConfigError(
                f"the staged dataset {spec.data.path} was tokenized with {manifest.vocab_size} tokens, more "
                f"than the model's vocabulary of {spec.model.vocab_size}: add --vocab-size "
                f"{manifest.vocab_size} (model.vocab_size), or stage the data with --vocab-size "
                f"{spec.model.vocab_size}"
            )
    elif looks_local(spec.data.dataset) and not _present(spec.data.dataset):
        raise ConfigError(
            f"data.dataset {spec.data.dataset!r}: no such file or folder (give a local path or a hub id "
            "org/name)"
        )
    elif _present(spec.data.dataset):
        try:
            check_local_dataset(spec.data)
        except StageError as e:
            raise ConfigError(str(e)) from None
    for src in spec.data.mixture:
        if not src.path and looks_local(src.dataset) and not _present(src.dataset):
            raise ConfigError(
                f"--dataset {src.dataset!r}: no such file or folder (give a local path or org/name)"
            )
    if not spec.data.path and spec.data.tokenizer != "train" and not _present(spec.data.tokenizer, file=True):
        raise ConfigError(
            f"data.tokenizer {spec.data.tokenizer!r}: no such file (give a tokenizer.json path, or 'train')"
        )


def _present(path: str, file: bool = False) -> bool:
    """Whether `path` exists (as a file); False for a name the filesystem refuses (too long)."""
    try:
        return Path(path).is_file() if file else Path(path).exists()
    except OSError:
        return False


def launch(
    preset: str,
    overrides: list[str] | None = None,
    *,
    name: str | None = None,
    mode: str | None = None,
    workers: int = 2,
    store: str | None = None,
    wandb: bool = False,
    dry_run: bool = False,
    root: Path | None = None,
    hardware: Hardware | None = None,
    show_plan=None,
    max_cost: float | None = None,
    confirm=None,
    mixture: list[dict] | None = None,
    init_from: str | None = None,
) -> Launched:
    """Render runs/<name>/ and (unless dry_run) start it: its driver detached (local) or its SkyPilot job
    (cloud, when `hardware` is given). Raises ConfigError, writing nothing, for any bad input.
    show_plan(plan) is called for a cloud run before anything is spent; then the plan's cost is held to
    `max_cost` and, unless dry_run, `confirm(plan)` may decline (check_spending)."""
    backend = backends.for_mode(mode or ("cloud" if hardware else "local"))
    if backend.rents != (hardware is not None):
        raise ConfigError(
            "--gpu is for cloud runs (drop --mode local)"
            if hardware
            else "a cloud run needs --gpu, e.g. --gpu RTX5090 (lmctl plan shows what fits where)"
        )
    spec = resolve_spec(preset, overrides or [], wandb, mixture)
    root = runs.runs_root(root)
    if init_from:  # the source's shape and tokenizer, its weights loaded by the workers
        from orchestrator.init_source import with_init

        spec = with_init(spec, init_from, root, overrides or [], cloud=hardware is not None)
    name = runs.check_name(name) if name is not None else runs.generate_name(preset)
    path = root / name
    exists = ConfigError(f"run {name!r} already exists in {root}: `lmctl resume {name}` continues it")
    if path.exists():  # before the plan is shown: a refused launch prints only its error
        raise exists
    store = store if store is not None else runs.default_store(root)  # '' is no store
    store = store.rstrip("/") if not store.rstrip("/").endswith(":") else store  # file:/// stays itself
    cloud_plan = plan_cloud(spec, hardware, store) if hardware else None
    asked = spec.train.micro_batch_size, spec.train.activation_checkpointing
    if cloud_plan:
        chosen = chosen_train_keys(preset, overrides or [])
        spec, workers = with_planned_interval(cloud_plan.spec, cloud_plan.plan, chosen), cloud_plan.workers
    _check_inputs(spec, workers, store)
    warn_before_launch(spec, preset, backend.mode, workers)  # a local run that would take days here
    if cloud_plan and not dry_run:
        _check_reachable(store)
    if cloud_plan and show_plan:
        show_plan(cloud_plan.plan)
    if cloud_plan:
        check_spending(cloud_plan.plan, max_cost, None if dry_run else confirm)
    root.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()  # atomic: of two launches racing for one name, one wins
    except FileExistsError:
        raise exists from None
    try:
        os.chmod(path, 0o700)  # run state stays the owner's
        (path / "logs").mkdir()
        spec.write(path)
        resources, nodes = (cloud_plan.resources, hardware.nodes) if cloud_plan else (None, 1)
        (path / runs.TASK).write_text(render_task(name, store, workers, resources, nodes))
        record = runs.new_record(name, backend.mode, "created", preset, store, workers, spec)
        record.dry_run = dry_run
        if cloud_plan:
            _set_hardware(record, hardware, cloud_plan)
            record.micro_batch_size, record.activation_checkpointing = asked
        runs.write_record(path, record)
        if cloud_plan:
            from orchestrator import cloud

            cloud.load_task(path / runs.TASK)  # SkyPilot's own schema, offline: a bad task fails here
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # nothing half-written
        raise
    if not dry_run:
        record = backend.start(path)
    return Launched(name, path, record, spec)


def _check_reachable(store: str) -> None:
    """Before anything is written or rented: the bucket exists and these credentials may use it."""
    from model.store import StoreError, open_store

    try:
        open_store(store).check()
    except (StoreError, ValueError) as e:
        raise ConfigError(f"--store {store!r}: {e}") from None


def _set_hardware(record: runs.RunRecord, hw: Hardware, cloud_plan: CloudPlan) -> None:
    plan = cloud_plan.plan
    record.gpu = cloud_plan.gpu
    record.nodes, record.cloud, record.spot, record.managed = hw.nodes, hw.cloud, hw.spot, hw.managed
    record.disk_size, record.image = hw.disk_size, hw.image
    record.workers = cloud_plan.workers
    price = plan.price_per_gpu_hour
    record.price_per_hour = None if price is None else price * plan.world
    record.plan = plan.summary()


def resume(
    name: str,
    root: Path | None = None,
    hardware: Hardware | None = None,
    *,
    steps: int | None = None,
    notify=None,
    show_plan=None,
    max_cost: float | None = None,
    confirm=None,
) -> runs.RunRecord:
    """Start a stopped, failed or dry-run run again; it continues from its newest committed checkpoint.
    A cloud run may move to other `hardware`: the global batch, and so the data order, stay the same.

    steps: train a stopped or finished run on to this many steps (extend_schedule); notify(text) hears how
    its schedule changes. A cloud run shows its plan for the steps left (show_plan), held to max_cost and
    confirm() as a launch is, before anything is written or rented."""
    path = runs.find_run(runs.runs_root(root), name)
    backend = backends.of(runs.read_record(path))
    record = backend.refresh(path)  # is it still running?
    state = runs.effective_state(record)
    if state in runs.ACTIVE:
        raise ConfigError(
            f"run {name!r} is {state}: `lmctl attach {name}` follows it, `lmctl stop {name}` stops it"
        )
    if state == "finished" and steps is None:
        raise ConfigError(
            f"run {name!r} has finished all {record.steps} steps, so there is nothing to resume; "
            f"`lmctl resume {name} --steps N` trains it further"
        )
    if hardware and not backend.rents:
        raise ConfigError(f"run {name!r} is a local run: --gpu and friends apply to cloud runs")
    spec, done = load_spec(path / runs.CONFIG), _trained_steps(record)
    if steps is not None:
        planned, spec = spec, extend_schedule(spec, steps, done, name)
        if notify:
            notify(schedule_change(planned.train, spec.train, done))
    spec = backend.plan_resume(path, record, spec, done, hardware, show_plan, max_cost, confirm)
    spec.write(path)
    runs.update_record(path, steps=spec.train.steps)
    return backend.start(path)


def replan(path: Path, record, spec: RunSpec, done: int, hardware, show_plan, max_cost, confirm) -> RunSpec:
    """A cloud run resumed: the plan for its steps left, shown and held to max_cost and confirm() as at
    launch. On other `hardware` the run is re-rendered for it (the plan starts from the micro-batch and
    checkpointing first asked for, so `auto` chooses afresh and a move back to bigger GPUs regains them);
    the global batch, and so the data order, stay. Returns the spec to write."""
    hw = hardware or _hardware_of(record)
    if hardware:
        if record.micro_batch_size:
            spec = spec.with_train(micro_batch_size=record.micro_batch_size)
        if record.activation_checkpointing:
            spec = spec.with_train(activation_checkpointing=record.activation_checkpointing)
    cloud_plan = plan_cloud(spec, hw, record.store, steps_left=spec.train.steps - done)
    if show_plan:
        show_plan(cloud_plan.plan)
    check_spending(cloud_plan.plan, max_cost, confirm)
    if not hardware:
        return spec
    spec = with_planned_interval(cloud_plan.spec, cloud_plan.plan, _kept_on_a_move(spec, record.plan))
    _set_hardware(record, hw, cloud_plan)
    atomic_write(
        path / runs.TASK,
        [render_task(record.name, record.store, record.workers, cloud_plan.resources, hw.nodes).encode()],
    )
    fields = ("gpu", "nodes", "cloud", "spot", "managed", "disk_size", "image", "workers", "price_per_hour")
    runs.update_record(path, **{k: getattr(record, k) for k in (*fields, "plan")})
    return spec


def _kept_on_a_move(spec: RunSpec, last_plan: dict | None) -> set[str]:
    """The interval settings a run moving to other hardware keeps: a number of steps, and what its last plan
    did not write (the user's own); the rest follows the new plan."""
    t = spec.train
    if t.checkpoint_every != "auto":
        return {"checkpoint_every"}
    planned = {k: (last_plan or {}).get(k) for k in ("mtbf_hours", "checkpoint_cost_s")}
    return {k for k, v in planned.items() if v is None or getattr(t, k) != _rounded(v)}


def _trained_steps(record: runs.RunRecord) -> int:
    """Steps of the run's newest committed checkpoint (0 before any): the store's word, not the metrics'."""
    from model.state import committed_step
    from model.store import StoreError

    try:
        return committed_step(record.checkpoints)
    except (StoreError, OSError) as e:
        raise ConfigError(
            f"could not list run {record.name!r}'s checkpoints in {record.checkpoints}: {e}"
        ) from None


def extend_schedule(spec: RunSpec, steps: int, done: int, name: str) -> RunSpec:
    """`spec` planned for `steps` steps instead. Only a WSD schedule extends cleanly: its rate before the
    decay does not depend on train.steps, so the decay just moves to the new end. Cosine's rate at every step
    does, so extending it would bend the curve already trained: refused, with the reason."""
    from model.optim import lr_at

    t = spec.train
    if not isinstance(steps, int) or steps <= t.steps:
        raise ConfigError(
            f"--steps {steps}: run {name!r} is planned for {t.steps} steps ({done} trained); --steps extends "
            f"a run, so give more than {t.steps}"
        )
    if steps > 10**9:
        raise ConfigError(f"--steps {steps}: at most 1000000000")
    longer = spec.with_train(steps=steps)
    if t.schedule == "cosine":
        raise ConfigError(
            f"run {name!r} uses the cosine schedule, whose rate at every step depends on train.steps: going "
            f"to {steps} steps would lift the rate at step {done} from {lr_at(done, t):.2e} to "
            f"{lr_at(done, longer.train):.2e}. Runs you may extend use the WSD schedule (the default; "
            "train.schedule=wsd), whose decay simply moves to the new end"
        )
    return longer


def schedule_change(old, new, done: int) -> str:
    """One line on what an extension does to the learning rate (old and new TrainConfig, WSD)."""
    from model.optim import wsd_decay_start

    start, new_start = wsd_decay_start(old), wsd_decay_start(new)
    min_lr = new.lr * new.min_lr_ratio
    then = f"holds {new.lr:.2e} to step {new_start}, then decays to {min_lr:.2e} at step {new.steps}"
    if done > start:
        return (
            f"extending from {old.steps} to {new.steps} steps: the run has been decaying since step {start}, "
            f"so its rate re-warms to {new.lr:.2e} at step {done}, {then}"
        )
    return (
        f"extending from {old.steps} to {new.steps} steps: the rate {then}, as in a run planned for "
        f"{new.steps} steps (same batches, same rates)"
    )


def _hardware_of(record: runs.RunRecord) -> Hardware:
    """What a cloud run rents now, as its record says (the price per GPU-hour it was planned at)."""
    price = record.price_per_hour / record.workers if record.price_per_hour and record.workers else None
    return Hardware(
        gpu=record.gpu,
        nodes=record.nodes,
        cloud=record.cloud,
        spot=record.spot,
        managed=record.managed,
        disk_size=record.disk_size or DISK_GB,
        image=record.image,
        price=price,
    )


STOP_MARGIN_S = 60.0  # processes exiting, Ray shutting down, a slow first step
STOP_MIN_WAIT_S = 120.0


def stop_wait_s(path: Path, record: runs.RunRecord) -> float:
    """How long `stop` lets a run finish its step and checkpoint before killing it: a store poll (cloud), two
    of its steps and two of its checkpoints as measured in metrics.jsonl, and a margin; at least 2 minutes.

    Before a checkpoint was measured, its time is the plan's estimate (preemption.checkpoint_cost_s: the
    state's size at the store bandwidth configs/pricing/preemption.yaml assumes).
    """
    from model.metrics import read_metrics
    from orchestrator import preemption

    recs = read_metrics(path / runs.METRICS) if (path / runs.METRICS).exists() else []
    rates = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
    step_s = record.global_batch_tokens / rates[-1] if rates and record.global_batch_tokens else 0.0
    step_s = max([step_s] + [r["step_s"] for r in recs if r.get("step_s")])
    ckpt_s = max((r["checkpoint_s"] for r in recs if r.get("checkpoint_s") is not None), default=None)
    if ckpt_s is None:
        try:
            model, bandwidth = load_spec(path / runs.CONFIG).model, preemption.load_table()["store_mb_per_s"]
            ckpt_s = preemption.checkpoint_cost_s(model, bandwidth)
        except ConfigError:
            ckpt_s = 0.0
    poll = 0.0 if record.store.startswith("file://") else runs.STOP_POLL_S  # as runs.StopRequest polls
    return max(STOP_MIN_WAIT_S, poll + 2 * step_s + 2 * ckpt_s + STOP_MARGIN_S)


def _checkpointing(path: Path) -> bool:
    """The run saw the stop and its last checkpoint has not committed yet (metrics.jsonl says so)."""
    from model.metrics import read_metrics

    if not (path / runs.METRICS).exists():
        return False
    recs = read_metrics(path / runs.METRICS)
    asked = [r["step"] for r in recs if r.get("stop")]
    return bool(asked) and not any(r.get("checkpoint") == asked[-1] for r in recs)


def _wait_stopped(path: Path, timeout: float, active, poll_s: float) -> bool:
    """Poll active() until it is false or `timeout` has passed; once more as long while the stop's
    checkpoint is still being written (so a slow upload is not cut short). Whether it is still active."""
    deadline, extended = time.monotonic() + timeout, False
    while active():
        if time.monotonic() >= deadline:
            if extended or not _checkpointing(path):
                return True
            deadline, extended = time.monotonic() + timeout, True
        time.sleep(poll_s)
    return False


def stop(name: str, root: Path | None = None, timeout: float | None = None) -> runs.RunRecord:
    """Checkpoint and stop a running run, then make sure none of its processes (or its job) is left.

    The stop request goes to the store first (it needs no SkyPilot): the workers checkpoint and the run
    ends by itself. timeout: seconds before the run is ended by its backend (killed, cancelled); default
    stop_wait_s(). Past it, a run that is still writing the checkpoint of its stop is given that long again,
    so a slow upload is not cut short.
    """
    path = runs.find_run(runs.runs_root(root), name)
    record = runs.read_record(path)
    backend = backends.of(record)
    timeout = stop_wait_s(path, record) if timeout is None else timeout
    if runs.effective_state(record) not in runs.ACTIVE:  # from the record: the request needs no SkyPilot
        backend.reap(path)  # a driver that died: what it left behind, as resume reaps it
        return runs.read_record(path)
    runs.StopRequest(record.store, record.name).ask()
    runs.update_record(path, state="stopping")
    if _wait_stopped(path, timeout, lambda: backend.active(path), poll_s=backend.poll_s):
        end_now(
            path,
            f"not stopped after {timeout:.0f} s, {backend.ends}; resume continues from its last checkpoint",
        )
    else:  # Ray's agents a local driver could not reap, or a plain cluster's GPUs; a run that ended without
        backend.reap(path, state="stopped", message="stopped by lmctl stop")  # saying how is stopped
    return runs.read_record(path)


def end_now(path: Path, why: str) -> runs.RunRecord:
    """End a run at once, without a checkpoint (its backend kills or cancels it); it is recorded as stopped,
    and `why`."""
    backends.of(runs.read_record(path)).cancel(path)
    return runs.update_record(path, state="stopped", message=why)
