"""lmctl command line. Every verb is a thin layer over a Python function; heavy imports happen inside verbs,
so `lmctl --help` stays instant."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from pathlib import Path

from model.errors import did_you_mean, positive_int
from model.hardware import DEFAULT_MFU

EPILOG = """examples:
  lmctl launch --mode local --config tiny         stage, then train here with 2 Ray workers (detached)
  lmctl launch --config tiny --name dev --override train.steps=500 --foreground
  lmctl launch --config 124m --dry-run            render runs/<name>/ (config.yaml, task.yaml), launch nothing
  lmctl plan --gpu RTX5090 --config 1b            memory, micro-batch, tokens/s, time and cost before renting
  lmctl launch --gpu RTX5090 --config 1b --dataset HuggingFaceFW/fineweb-edu --store s3://my-bucket/lm
                                                  shows the plan and its cost, asks, submits a SkyPilot
                                                  managed job (spot-safe); its nodes stage the hub data
  lmctl launch --gpu H100:8 --config 1b --store s3://my-bucket/lm --yes --max-cost 500    scripts: no question
  lmctl launch --gpu H100:8 --nodes 2 --cloud aws --spot --config 1b --store s3://my-bucket/lm --dry-run
  lmctl resume big --gpu H100:4                   continue a cloud run on other GPUs (same global batch)
  lmctl status                                    every run: state (dry-run if never started), step, loss, ...
  lmctl status dev                                one run in detail, with its loadable checkpoints
  lmctl checkpoints dev --json                    committed checkpoints: step, size, when committed, where
  lmctl rm dev                                    remove the run's folder and store objects (asks; --yes)
  lmctl logs dev -f                               follow a run's log until it ends
  lmctl attach dev                                live dashboard; Ctrl-C detaches, the run goes on
  lmctl stop dev                                  checkpoint and stop; nothing left running (a dead driver's
                                                  leftovers are reaped too)
  lmctl resume dev                                continue from the newest committed checkpoint
  lmctl resume dev --steps 4000                   train a stopped or finished (WSD) run on to 4000 steps
  lmctl generate dev --prompt "ROMEO:"            sample from the latest checkpoint
  lmctl export dev --hf runs/exports/dev          Hugging Face Llama folder (transformers can load it)
  lmctl eval dev --task hellaswag --task shakespeare_mc       multiple-choice accuracy of its checkpoint
  lmctl plot dev                                  loss against tokens, as runs/dev/loss.png
  lmctl report dev                                what it did and cost: runs/dev/report/ (report.md, PNGs)
  lmctl presets                                   list model presets and their sizes
  lmctl train --config tiny --run-dir runs/dev    train in this process (no Ray), resuming if the run exists
  lmctl train --config tiny --run-dir runs/dev --override train.steps=50 --override train.lr=1e-3
  lmctl train --config 1b --run-dir runs/prof --profile 5     trace, memory snapshot and top ops of 5 steps
  lmctl stage --dataset configs/data/shakespeare.jsonl --vocab-size 2048      tokenize once into runs/store
  lmctl stage --dataset HuggingFaceFW/fineweb-edu --subset sample-10BT --max-tokens 1e9 --store s3://bucket/lmctl
  lmctl stage --dataset HuggingFaceFW/fineweb-edu --store s3://bucket/lmctl --cloud --cpus 32 --nodes 4
"""

STAGE_FLAGS = {  # DataConfig field -> the flag that sets it, for one-line validation errors
    "dataset": "--dataset",
    "subset": "--subset",
    "split": "--split",
    "revision": "--revision",
    "text_field": "--text-field",
    "tokenizer": "--tokenizer",
    "val_fraction": "--val-fraction",
    "shard_tokens": "--shard-tokens",
    "max_tokens": "--max-tokens",
}


def cmd_presets(args: argparse.Namespace) -> int:
    from model.config import flops_per_token, human, param_count, preset_names, resolve

    rows = []
    for name in preset_names():
        m, t = (spec := resolve(name)).model, spec.train
        rows.append(
            {
                "preset": name,
                "params": param_count(m),
                "layers": m.n_layers,
                "d_model": m.d_model,
                "heads": f"{m.n_heads}/{m.n_kv_heads}",
                "seq_len": m.seq_len,
                "flops_per_token": flops_per_token(m),
                "global_batch_tokens": t.global_batch_tokens,
                "steps": t.steps,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "preset", "params", "layers", "d_model", "heads (q/kv)", "seq", "FLOPs/token", "batch tokens"
    )
    counts = ("params", "flops_per_token", "global_batch_tokens")  # shown as 1.2B, 350M
    for r in sorted(rows, key=lambda r: r["params"]):
        table.add_row(*(human(v) if k in counts else str(v) for k, v in r.items() if k != "steps"))
    Console().print(table)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`lmctl train ARGS` is `python -m model.train ARGS`: one set of flags, defined there."""
    from model.train import main as train_main

    return train_main(args.train_args, prog="lmctl train")


def _tokens(text: str) -> int:
    return positive_int(text, "tokens")


def _finite(text: str, ok, allowed: str) -> float:
    """A finite float that passes `ok`; else argparse's one-line refusal saying what is `allowed`."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: {allowed}")
    return value


def _temperature(text: str) -> float:
    return _finite(text, lambda t: t >= 0, "give a number >= 0 (0 = greedy)")


def _top_p(text: str) -> float:
    return _finite(text, lambda p: 0 < p <= 1, "give a number in (0, 1], e.g. 0.9")


def _count(text: str) -> int:
    """'1e9', '500M', '2_000_000' -> int: token counts are easier to type in these forms."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}
    t = text.strip().lower().replace("_", "")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t)) if ("e" in t or "." in t) else int(t)
    except (ValueError, OverflowError):  # OverflowError: 1e400, inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 1000000, 1e9, 500M)") from None


def cmd_stage(args: argparse.Namespace) -> int:
    import datasets
    from pydantic import ValidationError

    from model.config import ConfigError, DataConfig
    from model.store import StoreError
    from orchestrator.stage import StageError, StageInterrupted, stage

    datasets.disable_progress_bars()  # our own bar; datasets' would interleave with it
    datasets.logging.set_verbosity_error()
    fields = {k: getattr(args, k) for k in STAGE_FLAGS if getattr(args, k) is not None}
    try:
        spec = DataConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        flag = STAGE_FLAGS.get(str(err["loc"][0]), str(err["loc"][0]))
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        raise ConfigError(f"{flag} {err['input']!r}: {msg}") from None
    from orchestrator.runs import default_store, runs_root

    if not (math.isfinite(args.tokenizer_sample_mb) and args.tokenizer_sample_mb * 1e6 >= 1):
        raise ConfigError(f"--tokenizer-sample-mb {args.tokenizer_sample_mb}: give a positive number of MB")
    store = args.store if args.store is not None else default_store(runs_root())  # '' is no store
    sample_chars = int(args.tokenizer_sample_mb * 1e6)
    try:
        if args.cloud:
            return _stage_in_the_cloud(args, spec, store, sample_chars)
        with _units_runner(args.workers) as runner:
            result = stage(
                spec,
                store,
                vocab_size=args.vocab_size,
                endpoint_url=args.endpoint_url,
                sample_chars=sample_chars,
                progress=not args.json and sys.stderr.isatty(),
                runner=runner,
            )
    except (StageError, StoreError) as e:
        raise ConfigError(str(e)) from None
    except StageInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before staging began uploading: there is nothing to keep
        print("interrupted: nothing uploaded yet; run the same command again to start over", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    _print_stage_summary(result)
    return 0


@contextlib.contextmanager
def _units_runner(workers: int):
    """Where `lmctl stage` runs its units: this process (1), or a Ray cluster of `workers` CPUs on this
    machine, one unit per CPU at once."""
    if workers == 1:
        yield None
        return
    from orchestrator.driver import start_ray
    from orchestrator.stage_unit import RayUnits

    start_ray(workers, None)
    try:
        yield RayUnits()
    finally:
        import ray

        ray.shutdown()


def _stage_in_the_cloud(args: argparse.Namespace, spec, store: str, sample_chars: int) -> int:
    from orchestrator import stage_job

    if args.endpoint_url:
        raise _config_error(
            "--endpoint-url is this machine's; for --cloud set AWS_ENDPOINT_URL, which the job gets"
        )
    if args.workers != 1:
        raise _config_error(
            "--workers is for staging here; a --cloud job uses every CPU of its machines (--cpus)"
        )
    out = stage_job.submit(
        spec, store, vocab_size=args.vocab_size, sample_chars=sample_chars, cpus=args.cpus, nodes=args.nodes
    )
    if args.json:
        print(json.dumps(out, indent=2))
    elif out["reused"]:
        print(f"already staged: {out['dataset_uri']}")
    else:
        print(f"submitted SkyPilot job {out['job_id']} ({out['name']}): {out['dataset']} @ {out['revision']}")
        print(f"it commits {out['dataset_uri']}; follow it with: sky jobs logs {out['job_id']}")
        print(f"then train on it: lmctl launch --dataset {out['dataset_uri']} ...")
    return 0


def _print_stage_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from orchestrator.progress import human

    d = result.to_dict()
    table = Table(
        show_header=False, title="reused: already staged, nothing to do" if result.reused else "staged"
    )
    rows = [
        ("dataset", f"{d['dataset']}" + (f" @ {d['revision']}" if d["revision"] else "")),
        ("staged at", d["dataset_uri"]),
        ("documents", human(d["documents"]) if d["documents"] is not None else "-"),
        ("tokens", f"{human(d['tokens'])} (train {human(d['train_tokens'])}, val {human(d['val_tokens'])})"),
        ("shards", f"{d['train_shards']} train + {d['val_shards']} val, {d['dtype']}"),
        ("tokenizer", f"{d['vocab_size']} tokens, sha256 {d['tokenizer_sha256'][:12]}"),
        (
            "time",
            f"{d['seconds']:.1f} s" + (f", {human(d['tokens_per_s'])} tokens/s" if d["tokens_per_s"] else ""),
        ),
    ]
    if not result.reused:
        rows.append(("objects", f"{len(d['uploaded'])} uploaded, {len(d['skipped'])} already in place"))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    print(f"data.path={d['dataset_uri']}")


# ---------------------------------------------------------------- runs: launch, observe, control


def _root(args: argparse.Namespace) -> Path:
    from orchestrator.runs import runs_root

    return runs_root(args.runs_dir)


def _run_path(args: argparse.Namespace) -> Path:
    from orchestrator.runs import find_run

    return find_run(_root(args), args.run)


def _hardware(args: argparse.Namespace, record=None):
    """The cloud flags as a launch.Hardware, or None for a local run. For `resume` of a cloud run
    (`record`), every flag not given keeps the run's current value."""
    from orchestrator.launch import DISK_GB, Hardware

    if record is None:
        given = [f for f in ("nodes", "cloud", "image", "price", "disk_size", *ASSUMPTION_FLAGS)]
        given = [f for f in given if getattr(args, f) is not None]
        if args.gpu is None:  # `--gpu ""` is a bad --gpu, not a local run
            if given or args.spot or args.no_managed:
                flag = (given or ["spot" if args.spot else "no_managed"])[0].replace("_", "-")
                raise _config_error(f"--{flag} is for cloud runs: add --gpu, e.g. --gpu RTX5090")
            return None

    def kept(flag: str, current):  # a flag given (even as 0 or '') is validated, never silently replaced
        return current if getattr(args, flag) is None else getattr(args, flag)

    return Hardware(
        gpu=kept("gpu", record.gpu if record else None),
        nodes=kept("nodes", record.nodes if record else 1),
        cloud=kept("cloud", record.cloud if record else None),
        spot=args.spot or bool(record and record.spot),
        managed=not args.no_managed and (record.managed if record else True),
        disk_size=kept("disk_size", (record.disk_size if record else None) or DISK_GB),
        image=args.image or (record.image if record else None),
        price=args.price,
        mfu=args.mfu,
        assume=_assumptions(args),
    )


ASSUMPTION_FLAGS = ("preemptions_per_hour", "recovery_minutes", "store_mbps")


def _assumptions(args: argparse.Namespace):
    """--preemptions-per-hour, --recovery-minutes, --store-mbps, as typed: one error line for a bad value."""
    from orchestrator.preemption import Assumptions

    return Assumptions(*(getattr(args, f) for f in ASSUMPTION_FLAGS))


def _config_error(message: str):
    from model.errors import ConfigError

    return ConfigError(message)


def _print_plan(plan) -> None:
    from rich.console import Console

    from orchestrator.plan import plan_renderable

    Console(stderr=True).print(plan_renderable(plan))


def _confirm(args: argparse.Namespace, question: str, needs_yes: str, declined: str) -> None:
    """--yes, or 'y' typed on a terminal. Without a terminal --yes is required (`needs_yes` says so): a
    script never spends or removes anything it did not ask for by name."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise _config_error(needs_yes)
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise _config_error(f"not confirmed: {declined}")


def _ask_to_spend(args: argparse.Namespace, verb: str):
    """confirm(plan) for a cloud launch or resume: the plan's GPUs, hours and dollars, then _confirm."""
    from orchestrator.plan import human_time

    def confirm(plan) -> None:
        cost = f"about ${plan.cost:,.2f}" if plan.cost is not None else "cost unknown (no price; --price)"
        what = f"{plan.world} x {plan.gpu} for about {human_time(plan.hours)} ({plan.mfu:.0%} MFU), {cost}"
        needs_yes = f"{verb} rents {what}: add --yes to go ahead (--max-cost USD caps it)"
        _confirm(args, f"{verb} rents {what}. Go ahead?", needs_yes, f"nothing {verb.rstrip('e')}ed")

    return confirm


def cmd_launch(args: argparse.Namespace) -> int:
    from orchestrator.launch import dataset_flags, launch, resolve_spec

    from_datasets, mixture = dataset_flags(args.dataset) if args.dataset else ([], None)
    overrides = [*args.override, *from_datasets]
    overrides += [f"{k}={getattr(args, f)}" for f, k in SOURCE_FLAGS.items() if getattr(args, f) is not None]
    if args.init_from and args.tokenizer:
        raise _config_error("--tokenizer with --init-from: the data is staged with the source's tokenizer")
    if args.print_config:
        spec = resolve_spec(args.config, overrides, args.wandb, mixture)
        if args.init_from:
            from orchestrator.init_source import with_init
            from orchestrator.runs import runs_root

            spec = with_init(spec, args.init_from, runs_root(args.runs_dir), overrides, cloud=bool(args.gpu))
        print(spec.to_yaml(), end="")
        return 0
    launched = launch(
        args.config,
        overrides,
        name=args.name,
        mode=args.mode,
        workers=args.workers,
        store=args.store,
        wandb=args.wandb,
        dry_run=args.dry_run,
        root=args.runs_dir,
        hardware=_hardware(args),
        show_plan=None if args.json else _print_plan,
        max_cost=args.max_cost,
        confirm=_ask_to_spend(args, "launch"),
        mixture=mixture,
        init_from=args.init_from,
    )
    name, path, record = launched.name, launched.path, launched.record
    if args.json:
        from dataclasses import asdict

        print(json.dumps({**asdict(record), "path": str(path)}, indent=1))
    elif args.dry_run:
        print(f"dry run: rendered {path}/ (config.yaml, task.yaml, run.json); nothing launched")
        print(f"  start it:  lmctl resume {name}")
    else:
        print(f"launched run {name} ({record.mode}, {_backend(record).where(record)}) in {path}")
        if not args.foreground:
            print(f"  follow:  lmctl logs {name} -f    dashboard: lmctl attach {name}")
            print(f"  status:  lmctl status {name}    stop: lmctl stop {name}")
    if args.foreground and not args.dry_run:
        return _follow(args, path)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from orchestrator.gpus import parse_gpu
    from orchestrator.launch import resolve_spec
    from orchestrator.plan import make_plan

    spec = resolve_spec(args.config, args.override)
    plan = make_plan(
        spec,
        parse_gpu(args.gpu),
        1 if args.nodes is None else args.nodes,
        cloud=args.cloud,
        spot=args.spot,
        mfu=args.mfu,
        price=args.price,
        tokens=args.tokens,
        tokens_per_param=args.tokens_per_param,
        assume=_assumptions(args),
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        from rich.console import Console

        from orchestrator.plan import plan_renderable

        Console().print(plan_renderable(plan))
    return 0 if plan.fits else 1


def _backend(record):
    from orchestrator import backends

    return backends.of(record)


def _follow(args: argparse.Namespace, path: Path) -> int:
    """Stay attached to a started run: print its log to the end (its exit code). Where Ctrl-C stops the run
    (a local run), it checkpoints first and a second Ctrl-C kills it; elsewhere Ctrl-C only detaches."""
    from orchestrator import launch, runs

    backend = _backend(runs.read_record(path))
    if not backend.ctrl_c_stops:
        return backend.tail_logs(path, follow=True)
    # Python leaves SIGINT ignored when its parent ignored it (a background job of a script, nohup); here a
    # SIGINT is a request to stop the run, so take it whatever we inherited.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        backend.tail_logs(path, follow=True)
    except KeyboardInterrupt:
        print("\nstopping: checkpoint at the end of this step (Ctrl-C again to kill)", file=sys.stderr)
        try:
            record = launch.stop(path.name, root=path.parent)
        except KeyboardInterrupt:
            launch.end_now(path, "killed by a second Ctrl-C")
            return 130
        print(f"run {path.name} {record.state}: lmctl resume {path.name} continues it", file=sys.stderr)
        return 130
    record = runs.read_record(path)
    return record.exit_code if record.exit_code is not None else 1


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.launch import resume
    from orchestrator.runs import read_record

    path = _run_path(args)
    hardware = None
    moved = [args.gpu, args.nodes, args.cloud, args.disk_size, args.image, args.spot, args.no_managed]
    moved += [args.price, *(getattr(args, f) for f in ASSUMPTION_FLAGS)]
    if any(v is not None and v is not False for v in moved):  # --nodes 0 is asked for, and refused
        record = read_record(path)
        if not _backend(record).rents:
            raise _config_error(f"run {args.run!r} is a local run: --gpu and friends apply to cloud runs")
        hardware = _hardware(args, record)
    record = resume(
        args.run,
        root=args.runs_dir,
        hardware=hardware,
        steps=args.steps,
        notify=lambda text: print(text, file=sys.stderr),
        show_plan=_print_plan,
        max_cost=args.max_cost,
        confirm=_ask_to_spend(args, "resume"),
    )
    where = f"launch {record.launches}, {_backend(record).where(record)}"
    print(f"resumed run {record.name} ({where}); it continues from its newest checkpoint")
    if args.foreground:
        return _follow(args, path)
    print(f"  follow:  lmctl logs {record.name} -f    dashboard: lmctl attach {record.name}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from orchestrator import observe, runs
    from orchestrator.launch import stop

    path = _run_path(args)
    record = runs.read_record(path)
    before = runs.effective_state(record)
    if before not in runs.ACTIVE:
        backend = _backend(record)
        killed = [] if backend.active(path) else backend.reap(path)  # what a dead driver left, as resume does
        after = runs.read_record(path).state
        if killed or after != record.state:
            gone = f"{len(killed)} leftover process(es) killed"
            print(f"run {args.run} was not running (its driver is gone): {gone}; now {after}")
        elif runs.never_started(record):
            print(f"run {args.run} is a dry run, never started: `lmctl resume {args.run}` starts it")
        else:
            print(f"run {args.run} is not running ({before})")
        return 0
    print(f"stopping {args.run}: checkpoint at the end of this step ...", file=sys.stderr)
    record = stop(args.run, root=args.runs_dir, timeout=args.timeout)
    summary = observe.run_summary(path)
    print(f"run {args.run} {record.state}: last checkpoint at step {summary['last_checkpoint']}")
    return 0


def _refreshed(path: Path) -> None:
    """A run's record brought up to date by its backend (a cloud run's from SkyPilot and the store); the
    last known state (with a warning) when they cannot be reached."""
    from orchestrator import runs

    record = runs.read_record(path)
    try:
        _backend(record).refresh(path)
    except Exception as e:  # noqa: BLE001 - status must still show what it knows
        print(f"warning: {record.name}: last known state shown; {str(e).splitlines()[0]}", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator import observe
    from orchestrator.runs import list_runs

    one = args.run is not None  # `lmctl status ""` is a bad name, not "every run"
    paths = [_run_path(args)] if one else list_runs(_root(args))
    for path in paths:
        _refreshed(path)
    summaries = [observe.run_summary(p) for p in paths]
    if one:  # one run's status lists its loadable checkpoints (every run's would read every store)
        summaries[0]["committed_checkpoints"] = _checkpoints_or_warn(paths[0])
    if args.json:
        print(json.dumps(summaries[0] if one else summaries, indent=1))
        return 0
    from rich.console import Console

    if not summaries:
        print(f"no runs in {_root(args)}; start one with: lmctl launch --mode local --config tiny")
        return 0
    Console().print(observe.status_detail(summaries[0]) if one else observe.status_table(summaries))
    return 0


def _checkpoints_or_warn(path: Path) -> list | None:
    """The run's loadable checkpoints; None, with a warning, when its store cannot be read: status still
    shows what it knows."""
    from model.store import StoreError
    from orchestrator import observe, runs

    record = runs.read_record(path)
    try:
        return observe.checkpoint_list(record)
    except StoreError as e:
        print(f"warning: {record.name}: checkpoints not listed; {e}", file=sys.stderr)
        return None


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from orchestrator import observe, runs

    record = runs.read_record(_run_path(args))
    with _unreadable_checkpoints_are_bad_input():
        listed = observe.checkpoint_list(record)
    if args.json:
        print(json.dumps(listed, indent=1))
    elif not listed:
        print(f"run {args.run} has no committed checkpoint yet ({record.checkpoints})")
    else:
        from rich.console import Console

        Console().print(observe.checkpoints_table(listed))
    return 0


def _removal_text(d: dict) -> str:
    from orchestrator.progress import human

    return "\n".join(
        [
            f"lmctl rm {d['run']} removes:",
            f"  the run folder {d['folder']}/",
            f"  {d['store_objects']} objects ({human(d['store_bytes'])}B) under {d['store_prefix']}/",
            "  (staged datasets in the store are shared by runs and stay)",
        ]
    )


def cmd_rm(args: argparse.Namespace) -> int:
    from orchestrator.remove import plan_removal, remove

    removal = plan_removal(args.run, root=args.runs_dir)
    planned = removal.to_dict()
    print(_removal_text(planned), file=sys.stderr if args.json else sys.stdout, flush=True)
    needs_yes = f"lmctl rm {args.run}: add --yes to remove without a terminal; nothing removed"
    _confirm(args, "remove?", needs_yes, "nothing removed")
    remove(removal)
    if args.json:
        print(json.dumps({**planned, "removed": True}, indent=1))
    else:
        print(f"removed run {args.run}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from orchestrator import runs

    path = _run_path(args)
    return _backend(runs.read_record(path)).tail_logs(path, follow=args.follow)


def cmd_attach(args: argparse.Namespace) -> int:
    from orchestrator import observe

    path = _run_path(args)
    if observe.attach(path, refresh=lambda: _refreshed(path)) == "detached":
        print(f"detached; the run goes on (lmctl attach {args.run} to come back)", file=sys.stderr)
    return 0


def _checkpoints(args: argparse.Namespace) -> str:
    from orchestrator.runs import read_record

    return read_record(_run_path(args)).checkpoints


@contextlib.contextmanager
def _unreadable_checkpoints_are_bad_input():
    """A store that cannot be read (no credentials, unreachable, missing bucket) or a checkpoint that does
    not verify: one line saying what and how to fix it, like any bad input, instead of a traceback."""
    from model.checkpoint import CheckpointError
    from model.store import StoreError

    try:
        yield
    except (StoreError, CheckpointError) as e:
        raise _config_error(str(e)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    checkpoints = _checkpoints(args)  # an unknown run is refused before torch is imported
    from model.inference import load_trained, sample

    with _unreadable_checkpoints_are_bad_input():
        trained = load_trained(checkpoints, args.step)
    try:
        text = sample(
            trained, args.prompt, args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed
        )
    except ValueError as e:  # a setting the model cannot take (argparse checked the ranges)
        raise _config_error(f"--max-tokens {args.max_tokens}: {e}") from None
    if args.json:
        print(json.dumps({"run": args.run, "step": trained.step, "prompt": args.prompt, "text": text}))
    else:
        print(args.prompt + text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a committed checkpoint on multiple-choice tasks; a local run's metrics.jsonl gets the result."""
    from orchestrator.runs import read_record

    path = _run_path(args)  # an unknown run is refused before torch is imported
    record = read_record(path)
    from model.evals import score_task
    from model.inference import load_trained
    from model.tasks import load_task, task_name

    with _unreadable_checkpoints_are_bad_input():
        trained = load_trained(record.checkpoints, args.step)
    tasks = args.task or trained.spec.train.evals
    if not tasks:
        raise _config_error(
            f"run {args.run} names no eval tasks (train.evals): give --task, e.g. --task shakespeare_mc"
        )
    examples = {task_name(t): load_task(t, args.examples) for t in tasks}  # every task checked first
    tok, cfg = trained.tokenizer, trained.spec.model
    scores = {name: score_task(trained.model, tok, ex, cfg.seq_len, "cpu") for name, ex in examples.items()}
    from orchestrator import backends

    if backends.of(record).owns_metrics:  # a cloud run's come from its store, where its pods write them
        from model.metrics import append_record

        append_record(path / "metrics.jsonl", {"step": trained.step, "evals": scores, "by": "lmctl eval"})
    if args.json:
        print(json.dumps({"run": args.run, "step": trained.step, "evals": scores}, indent=2))
        return 0
    for name, r in scores.items():
        print(
            f"{name}: acc {r['acc']:.3f}, acc_norm {r['acc_norm']:.3f} (chance {r['chance']:.3f}, "
            f"{r['n']} examples; {args.run} at step {trained.step})"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    checkpoints = _checkpoints(args)  # an unknown run is refused before torch is imported
    from model.inference import export_run

    with _unreadable_checkpoints_are_bad_input():
        out = export_run(checkpoints, args.hf, args.step, force=args.force)
    print(f"wrote a Hugging Face Llama folder to {out} (AutoModelForCausalLM.from_pretrained loads it)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from orchestrator import observe

    out = observe.plot(_run_path(args), Path(args.out) if args.out else None)
    print(out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator import report

    path = _run_path(args)
    _refreshed(path)  # a cloud run's metrics and timeline from its store, as status does
    out = report.write_report(path, Path(args.out) if args.out else None)
    print(json.dumps({"folder": str(out), **report.report_json(out)}, indent=1) if args.json else out)
    return 0


SOURCE_FLAGS = {  # launch's staging flags -> the config key each sets
    "subset": "data.subset",
    "split": "data.split",
    "revision": "data.revision",
    "text_field": "data.text_field",
    "max_tokens": "data.max_tokens",
    "tokenizer": "data.tokenizer",
    "vocab_size": "model.vocab_size",
}


def _add_source_flags(p) -> None:
    """What to read from the dataset and how to tokenize it: `stage` and `launch` take the same flags."""
    p.add_argument("--subset", help="hub config name, e.g. sample-10BT")
    p.add_argument("--split", help="split to stage (default: train)")
    p.add_argument("--revision", help="hub branch, tag or commit (default: main, pinned to its commit)")
    p.add_argument("--text-field", help="column holding the text (default: text)")
    p.add_argument(
        "--max-tokens",
        type=_count,
        help="stop after the document that reaches this many tokens (e.g. 1e9, 500M)",
    )
    p.add_argument("--tokenizer", help="path to a tokenizer.json, or 'train' (default): byte-level BPE")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="vocabulary of a trained tokenizer (stage default: 32768; launch: the "
        "model's, model.vocab_size)",
    )


def _add_mfu_flag(p) -> None:
    help_ = f"model FLOPs utilization the plan assumes (default {DEFAULT_MFU:.2f})"
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=help_)


def _add_assumption_flags(p) -> None:
    """What the plan assumes about interruptions, in place of configs/pricing/preemption.yaml."""
    p.add_argument(
        "--preemptions-per-hour",
        metavar="RATE",
        help="spot preemptions per node-hour the plan assumes (default: preemption.yaml's for the cloud)",
    )
    p.add_argument(
        "--recovery-minutes",
        metavar="MIN",
        help="minutes to provision and set up a replacement node (default: preemption.yaml's)",
    )
    p.add_argument(
        "--store-mbps",
        metavar="MB_PER_S",
        help="store bandwidth in MB/s for checkpoints and the data fetch (default: preemption.yaml's)",
    )


def _add_hardware_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cloud (SkyPilot)")
    g.add_argument(
        "--gpu",
        help="GPUs per node: RTX5090, A100-80GB:8, fallbacks in order RTX5090,RTX4090 (implies --mode cloud)",
    )
    g.add_argument("--nodes", type=int, help="nodes, each with --gpu (default 1; not on RunPod)")
    g.add_argument("--cloud", help="runpod, lambda, aws, gcp or kubernetes (default: any that has the GPU)")
    g.add_argument("--spot", action="store_true", help="spot/preemptible GPUs; the managed job recovers")
    g.add_argument(
        "--no-managed", action="store_true", help="a plain cluster (autodown when idle), no recovery"
    )
    g.add_argument("--disk-size", type=int, help="GB of disk per node (default 128)")
    g.add_argument("--image", help="image_id, e.g. docker:nvcr.io/nvidia/pytorch:25.01-py3")
    g.add_argument("--price", type=float, help="USD per GPU-hour for the plan (default: the price table)")
    _add_mfu_flag(g)
    _add_assumption_flags(g)
    g.add_argument("--yes", action="store_true", help="rent without asking (required without a terminal)")
    g.add_argument(
        "--max-cost", type=float, metavar="USD", help="refuse if the plan's cost (at --mfu) is above this"
    )


class _Parser(argparse.ArgumentParser):
    """argparse that names the nearest valid verb, choice or flag when one is mistyped, as Python 3.14's
    `suggest_on_error` does (we run on 3.11 too). The verbs' parsers are of this class as well."""

    verbs = None  # the subparsers action, once added

    def add_subparsers(self, **kwargs):
        self.verbs = super().add_subparsers(**kwargs)
        return self.verbs

    def _check_value(self, action, value):  # where argparse refuses a value not in `choices`, verbs included
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            hint = did_you_mean(str(value), [str(c) for c in action.choices], repr)
            if action is self.verbs:
                hint = hint or f"verbs: {', '.join(action.choices)}"
                raise argparse.ArgumentError(None, f"unknown verb {value!r}; {hint}") from None
            raise argparse.ArgumentError(action, f"{e.message}; {hint}" if hint else e.message) from None

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if getattr(namespace, "verb", None) == "train":  # model.train parses them
            namespace.train_args = extras
        elif extras:  # told by the verb's parser: its usage, and the flag nearest to a mistyped one
            parser = self.verbs.choices.get(getattr(namespace, "verb", None), self) if self.verbs else self
            parser.error(f"unrecognized arguments: {' '.join(extras)}{parser._flag_hint(extras)}")
        return namespace

    def _flag_hint(self, extras: list[str]) -> str:
        """'; did you mean --dry-run?' for the first unknown flag in `extras` that is close to one of ours."""
        flags = [flag for action in self._actions for flag in action.option_strings]
        for word in extras:
            if word.startswith("-") and (hint := did_you_mean(word.split("=", 1)[0], flags)):
                return f"; {hint}"
        return ""


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="lmctl",
        description="Pretrain Llama-style language models: presets, staging, training, checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="verb", metavar="VERB")

    runs_dir = argparse.ArgumentParser(add_help=False)
    runs_dir.add_argument(
        "--runs-dir", help="folder of run directories (default: $LMCTL_RUNS_DIR, else ./runs)"
    )
    one_run = argparse.ArgumentParser(add_help=False, parents=[runs_dir])
    one_run.add_argument("run", help="run name (see lmctl status)")

    p = sub.add_parser(
        "launch",
        parents=[runs_dir],
        help="render a run, stage its data, train it with Ray (detached; --foreground stays)",
        description="Resolve a preset and overrides into runs/<name>/ (config.yaml, task.yaml, run.json, "
        "logs/), stage the dataset to the store (a cloud run's own nodes stage a hub dataset; local files "
        "are staged from here), and train with Ray Train workers. Returns at once and prints how to follow "
        "the run, unless --foreground.",
    )
    p.add_argument("--config", default="tiny", help="preset name (tiny, 124m, 350m, 1b) or a YAML path")
    p.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.steps=100"
    )
    p.add_argument(
        "--dataset",
        action="append",
        metavar="DATASET[:WEIGHT]",
        help="hub id (org/name) or local file/folder to stage and train on (data.dataset), or a staged "
        "dataset: a folder with manifest.json or its store URI (data.path); a jsonl/json/parquet row is one "
        "document, a .txt file is one document. Twice or more: a mixture drawn by weight at batch time "
        "(data.mixture), e.g. --dataset HuggingFaceFW/fineweb-edu:0.7 --dataset bigcode/the-stack-smol:0.3; "
        "each is staged once, with the first one's tokenizer",
    )
    _add_source_flags(p.add_argument_group("staging (when --dataset is raw data)"))
    p.add_argument(
        "--init-from",
        metavar="SOURCE",
        help="continue pretraining from SOURCE's weights: a run (dev, or dev@200 for a committed step), a "
        "Hugging Face Llama folder (config.json, safetensors, tokenizer.json) or a hub model id. The model's "
        "shape is SOURCE's (model.seq_len stays the preset's unless overridden) and the data is staged with "
        "its tokenizer",
    )
    p.add_argument("--name", help="run name (default: <preset>-<date>-<time>-<random>)")
    p.add_argument(
        "--mode",
        choices=["local", "cloud"],
        help="local: Ray on this machine (default); cloud: SkyPilot (implied by --gpu)",
    )
    p.add_argument("--workers", type=int, default=2, help="local Ray Train workers (default 2)")
    p.add_argument(
        "--store", help="s3://bucket/prefix or file:///dir (default: $LMCTL_STORE, else runs/store)"
    )
    _add_hardware_flags(p)
    p.add_argument("--wandb", action="store_true", help="log to wandb (offline without WANDB_API_KEY)")
    p.add_argument("--foreground", action="store_true", help="stay attached: print the log until the end")
    p.add_argument("--dry-run", action="store_true", help="render the run directory; launch nothing")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--json", action="store_true", help="print the run record as JSON")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("status", parents=[runs_dir], help="runs and their true state (instant)")
    p.add_argument("run", nargs="?", help="one run in detail, with the checkpoints it can load")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "checkpoints",
        parents=[one_run],
        help="a run's loadable checkpoints: step, size, when committed, where",
        description="List a run's committed checkpoints (the steps generate, export and resume can load), "
        "from its checkpoint folder or store. Pruned or half-written steps are not listed.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_checkpoints)

    p = sub.add_parser(
        "rm",
        parents=[one_run],
        help="remove a run: its folder and its objects in the store (asks first)",
        description="Remove runs/<name>/ and every object under runs/<name>/ in the run's store "
        "(checkpoints, config, metrics). Staged datasets are shared by runs and stay. Prints what will go, "
        "then asks; a running run is refused (lmctl stop it first).",
    )
    p.add_argument("--yes", action="store_true", help="remove without asking (required without a terminal)")
    p.add_argument("--json", action="store_true", help="print what was removed as JSON (summary on stderr)")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("logs", parents=[one_run], help="print a run's log (-f: follow until it ends)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("attach", parents=[one_run], help="live dashboard of a run; Ctrl-C detaches")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser(
        "stop",
        parents=[one_run],
        help="checkpoint and stop a run; nothing left running (a dead driver's leftovers are reaped too)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds before killing (cloud: cancelling); default: two of the run's measured steps and "
        "checkpoints plus a margin, at least 120, and as long again if its stop checkpoint still uploads",
    )
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser(
        "resume",
        parents=[one_run],
        help="continue a run from its newest checkpoint",
        description="Start a stopped or failed run again from its newest committed checkpoint; with "
        "--steps, train a stopped or finished run further. A cloud run may move to other GPUs (--gpu, "
        "--nodes, --cloud, --spot): the global batch, and so the data order, stay the same; the micro-batch "
        "and gradient accumulation follow the new hardware. A cloud run shows the plan of the steps left and "
        "asks first (--yes for scripts).",
    )
    p.add_argument("--foreground", action="store_true", help="stay attached: print the log until the end")
    p.add_argument(
        "--steps",
        type=positive_int,
        metavar="N",
        help="train a stopped or finished run on to N steps in all: the WSD decay moves to the new end, the "
        "batches are those of a run planned for N (cosine runs are refused: their whole curve depends on N)",
    )
    _add_hardware_flags(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser(
        "plan",
        help="memory per GPU, micro-batch, tokens/s, time and cost of a config on a GPU",
        description="Estimate before renting: parameters, FLOPs per token, memory per GPU (weights, "
        "gradients, optimizer, activations; with and without activation checkpointing or FSDP) and whether "
        "it fits, the micro-batch and gradient accumulation, tokens/s at a stated MFU, and the time and cost "
        "to a token budget (default 20 tokens per parameter) at a price per GPU-hour (configs/pricing/"
        "prices.yaml, or --price); the expected interruptions (spot preemptions, failures), what each costs "
        "and, on spot, whether spot pays, and the checkpoint interval chosen for them (configs/pricing/"
        "preemption.yaml, or the flags). Every figure is an estimate from stated assumptions. Exit 1 when "
        "it does not fit.",
    )
    p.add_argument("--config", default="1b", help="preset name or YAML path (default 1b)")
    p.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="e.g. model.n_layers=24"
    )
    p.add_argument(
        "--gpu", required=True, help="e.g. RTX5090, H100-SXM:8, RTX5090,RTX4090 (first is planned)"
    )
    p.add_argument("--nodes", type=int, help="nodes (default 1)")
    p.add_argument("--cloud", help="runpod, lambda, aws, gcp or kubernetes (default: the cheapest)")
    p.add_argument("--spot", action="store_true", help="spot prices")
    _add_mfu_flag(p)
    p.add_argument("--price", type=float, help="USD per GPU-hour (default: the shipped price table)")
    p.add_argument("--tokens", type=_count, help="token budget, e.g. 26B (default: 20 x parameters)")
    p.add_argument("--tokens-per-param", type=float, default=20.0, help="budget per parameter (default 20)")
    _add_assumption_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", parents=[one_run], help="sample text from a run's latest checkpoint")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-tokens", type=_tokens, default=200, help="new tokens at most, >= 1 (default 200)")
    p.add_argument("--temperature", type=_temperature, default=0.8, help=">= 0; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=_tokens, default=50, help="sample among the k >= 1 likeliest (default 50)")
    p.add_argument("--top-p", type=_top_p, help="nucleus sampling threshold in (0, 1], e.g. 0.9")
    p.add_argument("--seed", type=int, default=0, help="same seed, same text")
    p.add_argument("--step", type=int, help="a committed checkpoint step (default: the newest)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval",
        parents=[one_run],
        help="score a run's checkpoint on multiple-choice tasks",
        description="Score a committed checkpoint (local or in the store) on multiple-choice tasks by the "
        "likelihood of each choice, as HellaSwag, ARC and PIQA are scored: acc picks the likeliest choice, "
        "acc_norm the likeliest per byte. Tasks: hellaswag, arc_easy, arc_challenge, piqa (read from the "
        "hub), a shipped one (configs/evals: shakespeare_mc), or a .jsonl of {context, choices, label} rows. "
        "A local run's metrics.jsonl gets the result (status and plot show it).",
    )
    p.add_argument("--task", action="append", help="a task (repeatable; default: the run's train.evals)")
    p.add_argument("--step", type=int, help="a committed checkpoint step (default: the newest)")
    p.add_argument("--examples", type=positive_int, help="examples per task at most (default: all)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export",
        parents=[one_run],
        help="write a Hugging Face Llama folder of a run",
        description="Write a run's checkpoint as a Hugging Face Llama folder (config.json, "
        "model.safetensors, tokenizer files, and lmctl_export.json naming the run and step). DIR must be new "
        "or an empty folder (missing parents are created); a previous lmctl export there is replaced only "
        "with --force, and a file or any other folder is refused: an export never removes what it did not "
        "write.",
    )
    p.add_argument("--hf", required=True, metavar="DIR", help="output folder, e.g. runs/exports/dev")
    p.add_argument("--step", type=int, help="a committed checkpoint step (default: the newest)")
    p.add_argument("--force", action="store_true", help="replace a previous lmctl export at DIR")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", parents=[one_run], help="PNG of train and val loss against tokens")
    p.add_argument("--out", help="PNG file path; missing folders are created (default: runs/<name>/loss.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "report",
        parents=[one_run],
        help="a folder of what a run did and cost: report.md and PNGs",
        description="Write a self-contained folder (default runs/<name>/report/): report.md (the run, the "
        "plan beside what happened, time and money by state, recoveries, evaluations), loss.png, speed.png, "
        "cost.png and report.json. Time is measured by the run's clocks; money is that time x a price that "
        "was assumed (a price table or --price), and every $ figure says so. A run without a price (local) "
        "is reported in hours. The folder is replaced whole; one holding other files is refused. Example: "
        "`lmctl report dev` writes runs/dev/report/ and prints that path; `lmctl report dev --out "
        "reports/dev --json` writes there and prints report.json.",
    )
    p.add_argument("--out", metavar="DIR", help="report folder; missing parents are created")
    p.add_argument(
        "--json", action="store_true", help="print the folder and report.json (the accounting) as JSON"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("presets", help="list model presets with parameter counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_presets)

    # Its flags are model.train's (`lmctl train --help` shows them); they pass through unparsed here.
    p = sub.add_parser(
        "train", add_help=False, help="run the training loop in this process (no Ray): debugging, benchmarks"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "stage",
        help="tokenize a dataset once into <store>/datasets/<hash>/ (resumable, a no-op when staged)",
        description="Tokenize a hub dataset or local files (jsonl, json, txt, parquet; a file or a folder), "
        "pack them into shards and upload them with a manifest to <store>/datasets/<hash>/. Staging the "
        "same thing again is a no-op; an interrupted staging resumes where it stopped.",
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="hub id (org/name) or a local file or folder; a jsonl/json/parquet row is one document, a .txt "
        "file is one document (not one per line)",
    )
    _add_source_flags(p)
    p.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=100.0,
        help="train on the first N million characters of text (default 100)",
    )
    p.add_argument(
        "--shard-tokens", type=_count, help="tokens per shard (default: 16777216; K/M/G = 1e3/1e6/1e9)"
    )
    p.add_argument("--val-fraction", type=float, help="held-out fraction of tokens (default: 0.05)")
    p.add_argument(
        "--store",
        help="s3://bucket/prefix, file:///dir or a directory (default: $LMCTL_STORE, else runs/store)",
    )
    p.add_argument(
        "--endpoint-url", help="S3 endpoint: R2, MinIO, B2, RunPod (default: $AWS_ENDPOINT_URL or AWS)"
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="units of work (input files) staged at once, as Ray tasks on this machine (default 1: in this "
        "process; tokenizing already uses every core)",
    )
    g = p.add_argument_group("in the cloud (SkyPilot)")
    g.add_argument(
        "--cloud",
        action="store_true",
        help="stage a hub dataset on a SkyPilot CPU job next to the hub and the bucket (a managed job: "
        "resumed after a preemption); this machine only pins the revision and submits (needs s3:// --store)",
    )
    g.add_argument(
        "--cpus",
        type=positive_int,
        default=8,
        help="CPUs per machine of the --cloud job, at least (default 8)",
    )
    g.add_argument("--nodes", type=positive_int, default=1, help="machines of the --cloud job (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (no progress bar, no table)")
    p.set_defaults(func=cmd_stage)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one verb; its exit code. A reader that goes away (`lmctl presets --json | head -1`) ends it
    quietly, as it would a Unix tool."""
    try:
        try:
            return _run_verb(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, where it can be caught, not at interpreter exit
    except BrokenPipeError:
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE: what a tool killed by the closed pipe reports


def _stdout_to_devnull() -> None:
    """Python flushes stdout once more at exit: point it at /dev/null, so that flush cannot fail too."""
    with contextlib.suppress(OSError, ValueError):  # stdout is not a real file (a test's capture)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run_verb(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for dest, value in vars(args).items():  # argparse (3.11) turns `--flag=--` into [] instead of refusing
        appended = dest in ("override", "dataset")  # action="append": a list of values
        if (value == [] and not appended) or (appended and isinstance(value, list) and [] in value):
            parser.error(f"argument --{dest.replace('_', '-')}: expected one argument")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from model.errors import UserError

    # Run state (run directories, logs, metrics, checkpoints and their cache, exports) is the owner's alone
    # whatever the caller's umask; the driver started from here inherits it. `stage` writes datasets, which
    # hold no credentials: readable as the caller's umask allows, never writable by others.
    umask = os.umask(0o077)
    if args.verb == "stage":
        os.umask(umask | 0o022)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        os.umask(umask)


if __name__ == "__main__":
    sys.exit(main())
