"""The training loop: one function for a plain process, torchrun, and every Ray Train worker.

    python -m model.train --config tiny --run-dir runs/plain        # one process, prepares data itself
    python -m model.train --run-config runs/x/config.yaml --run-dir runs/x
    torchrun --nproc_per_node 2 -m model.train --run-config ... --run-dir ...

On start it resumes from the newest committed checkpoint under <run-dir>/checkpoints by itself,
so whoever restarts a run (lmctl resume, Ray's FailureConfig, SkyPilot recovery) takes the same path.
The batch of step s depends only on (seed, s, global batch), so resuming needs only the step.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from model.checkpoint import CheckpointError
from model.checkpoint_interval import AutoCheckpoints
from model.config import ConfigError, RunSpec, flops_per_token, load_spec, resolve
from model.data import BatchLoader, Mixture, TokenDataset, eval_batches
from model.decoder import Decoder
from model.errors import positive_int
from model.evals import bits_per_byte, samples, score_task, text_bytes
from model.faults import fault_point
from model.hardware import peak_flops
from model.memory import choose
from model.metrics import MetricsLogger
from model.optim import build_optimizer, build_scheduler
from model.profiling import StepProfiler, phase
from model.shards import TOKENIZER
from model.staged import data_cache_dir, fetch_dataset, staged_manifest
from model.state import TrainingState, sharded
from model.store import StoreError
from model.tasks import load_task, task_name
from model.timeline import Clock
from model.tokenizer import Tokenizer


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    loss: float | None  # last logged training loss
    val_loss: float | None  # last evaluation
    stopped: bool  # True when asked to stop before the last step


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Join the process group Ray/torchrun prepared (or make one from torchrun's env); else single process.

    device: "cpu", "cuda" (this process's GPU is LOCAL_RANK's) or "cuda:N" (the one Ray Train assigned);
    None picks CUDA when there is one.
    """
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        # Before the first allocation: segments that grow instead of piling up fragments (varying eval and
        # train shapes otherwise strand GiBs of reserved but unusable memory).
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        dev = torch.device(device if device and ":" in device else f"cuda:{local_rank}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", device_id=dev if want_cuda else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Dist(rank, world, local_rank, dev)


def _all_reduce_mean(values: list[float], d: Dist) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    if d.world_size > 1:
        dist.all_reduce(t)
        t /= d.world_size
    return t.tolist()


def _any_rank(flag: bool, d: Dist) -> bool:
    """True when any rank raised the flag, so every rank stops at the same step."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def fit_to_device(spec: RunSpec, d: Dist) -> RunSpec:
    """`activation_checkpointing: auto` made concrete: on a GPU, the level and micro-batch that fit its memory
    and train fastest (model/memory.py, as `lmctl plan` shows); on a CPU, none at the config's micro-batch."""
    if spec.train.activation_checkpointing != "auto":
        return spec
    if d.device.type != "cuda":
        return spec.with_train(activation_checkpointing="none")
    props = torch.cuda.get_device_properties(d.device)
    chosen = choose(spec, d.world_size, props.total_memory)
    if chosen is None:
        raise ConfigError(
            f"the model does not fit on {d.world_size} x {props.name} ({props.total_memory / 2**30:.0f} GiB) "
            "at micro-batch 1 with any activation checkpointing; use more GPUs or train.parallel=fsdp"
        )
    level, micro = chosen
    if d.main:
        print(f"activation checkpointing {level}, micro-batch {micro}: fits {props.name} and trains fastest")
    return spec.with_train(activation_checkpointing=level, micro_batch_size=micro)


def wrap_model(model: Decoder, spec: RunSpec, d: Dist, bf16: bool) -> nn.Module:
    """Activation checkpointing, torch.compile per block, then FSDP2 or DDP, as the config asks.

    The order is torchtitan's: checkpointing and compilation act inside each block, the data-parallel
    wrapper outside them all.
    """
    model.set_activation_checkpointing(spec.train.activation_checkpointing)
    if spec.train.compile:
        model.compile_blocks()
    if sharded(spec, d):
        shard_fsdp(model, bf16)
        return model
    if d.world_size > 1:
        ids = [d.device.index] if d.device.type == "cuda" else None
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, not in a second copy (4N bytes)
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    return model


def shard_fsdp(model: Decoder, bf16: bool) -> None:
    """FSDP2: each block, then the root; bf16 compute with fp32 gradient reduction when training in bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = (
        {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
        if bf16
        else {}
    )
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def _no_sync(wrapped: nn.Module, raw: Decoder, last_micro: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step."""
    if last_micro:
        return contextlib.nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if hasattr(raw, "set_requires_gradient_sync"):  # FSDP2
        raw.set_requires_gradient_sync(False)
        return _ResyncOnExit(raw)
    return contextlib.nullcontext()


class _ResyncOnExit(contextlib.AbstractContextManager):
    def __init__(self, module):
        self.module = module

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)


@torch.no_grad()
def evaluate(model: nn.Module, batches, autocast, d: Dist, text_bytes: torch.Tensor) -> tuple[float, float]:
    """(mean loss, bits per byte) over every held-out sequence of every rank (batches may differ in size).
    Bits per byte leave out the targets that stand for no text (end-of-text): a second pass, with them
    ignored, gives the nats of the rest."""
    model.eval()
    total = count = nats = n_bytes = 0.0
    for x, y in batches:
        text = torch.where(text_bytes[y] > 0, y, -1)
        with autocast():
            loss, text_loss = model(x, y), model(x, text)
        total += loss.item() * x.shape[0]
        count += x.shape[0]
        nats += text_loss.item() * int((text != -1).sum())
        n_bytes += int(text_bytes[y].sum())
    model.train()
    total, count, nats, n_bytes = _all_reduce_mean([total, count, nats, n_bytes], d)
    return total / max(count, 1), bits_per_byte(nats, n_bytes)


def train(
    spec: RunSpec,
    run_dir: str | Path,
    *,
    device: str | None = None,
    stop_at: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_log: Callable[[dict], None] | None = None,
    checkpoints: str | Path | None = None,
    profile_steps: int = 0,
    launch: dict | None = None,
) -> TrainResult:
    """Train `spec` in `run_dir`, resuming from its newest committed checkpoint.

    stop_at: stop (with a checkpoint) once this many steps are done, as if asked to stop.
    should_stop: polled after every step (e.g. SIGTERM seen, a STOP file); any rank asking stops all ranks
        at that step, after a checkpoint of it.
    on_log: called on every rank with each logged record (Ray reports through this).
    checkpoints: where checkpoints live, default run_dir/checkpoints; a store URI such as
        s3://bucket/runs/<run>/checkpoints keeps them off the (maybe ephemeral) local disk.
    profile_steps: profile that many steps (after two warm-up steps) into run_dir/profile, then stop
        (model/profiling.py); rank 0 only.
    launch: {"began": unix time its driver started, "staging_s": seconds it staged data} for the timeline
        (model/timeline.py); default: this call began it and staged nothing.
    """
    started, began = time.perf_counter(), time.time()
    run_dir = Path(run_dir)
    t, m = spec.train, spec.model
    if not spec.data.path:
        raise ConfigError(
            "data.path is not set: stage the dataset first (a folder or store URI with a manifest.json)"
        )
    d = setup_distributed(device)
    spec = fit_to_device(spec, d)
    t = spec.train
    if d.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside bf16 autocast
    if d.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    bf16 = t.precision == "bf16" or (t.precision == "auto" and d.device.type == "cuda")
    # bf16 through autocast, except where FSDP's MixedPrecisionPolicy casts the sharded parameters itself
    autocast = (
        (lambda: torch.autocast(d.device.type, dtype=torch.bfloat16))
        if bf16 and not sharded(spec, d)
        else contextlib.nullcontext
    )

    # Data first: a wrong data.path fails here, before anything is written.
    fetching = time.perf_counter()
    train_data, val_data = open_data(spec, m.seq_len)
    data_s = time.perf_counter() - fetching
    if train_data.manifest.vocab_size > m.vocab_size:
        raise ConfigError(
            f"the staged tokenizer has {train_data.manifest.vocab_size} tokens but model.vocab_size is "
            f"{m.vocab_size}; set model.vocab_size >= {train_data.manifest.vocab_size}"
        )

    # Model, built identically on every rank from the seed, then (maybe) replaced by the checkpoint.
    torch.manual_seed(t.seed)
    raw = Decoder(m).to(d.device)
    model = wrap_model(raw, spec, d, bf16)
    opt = build_optimizer(raw, t)

    def checkpointed(s: int, seconds: float) -> None:  # metrics exists before any save
        metrics.log({"step": s, "checkpoint": s, "checkpoint_s": round(seconds, 3)})
        if auto:
            auto.committed(seconds)

    checkpoints = run_dir / "checkpoints" if checkpoints is None else checkpoints
    state = TrainingState(checkpoints, spec, raw, opt, d, train_data.manifest.tokenizer_sha256, checkpointed)
    restoring = time.perf_counter()
    start_step = state.restore()
    restore_s = time.perf_counter() - restoring
    sched = build_scheduler(opt, t, start_step)  # this config's schedule: train.steps may have grown
    if start_step and d.main:
        print(f"resumed from checkpoint at step {start_step}", flush=True)

    loader = BatchLoader(
        train_data, spec.global_batch_seqs, t.micro_batch_size, d.rank, d.world_size, t.seed, d.device
    )
    val_batches = eval_batches(val_data, t.eval_batches, t.micro_batch_size, d.rank, d.world_size, d.device)
    tok = Tokenizer.load(train_data.data_dir / TOKENIZER)
    bytes_of = text_bytes(tok, m.vocab_size, d.device)
    tasks = {task_name(task): load_task(task, t.eval_examples) for task in t.evals}

    run_id = run_dir.resolve().name
    metrics = MetricsLogger(run_dir, spec, run_id, start_step, enabled=d.main)
    peak = peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None
    fpt = flops_per_token(m)
    clock = Clock(run_dir, d.main, **({"began": began} | (launch or {})))
    auto = AutoCheckpoints(t.mtbf_hours * 3600, t.checkpoint_cost_s) if t.checkpoint_every == "auto" else None
    if auto:
        auto.last_save = start_step

    def log(rec: dict) -> None:
        metrics.log(rec)
        if on_log:
            on_log(rec)

    profiler = (
        StepProfiler(run_dir / "profile", profile_steps, d.device) if profile_steps and d.main else None
    )
    if profile_steps:
        stop_at = start_step + StepProfiler.total(profile_steps)
    stop_requested = False
    last_loss = last_val = None
    step = start_step
    tick, tick_step = time.perf_counter(), start_step
    model.train()
    clock.start(start_step, start_step * t.global_batch_tokens, data_s=data_s, restore_s=restore_s)
    try:
        while step < t.steps:
            step_began = time.perf_counter()
            loss_sum, grad_norm, lr = train_step(
                model, raw, opt, sched, loader.micro_batches(step), autocast, t
            )
            step += 1
            fault_point("train.step")
            if profiler:
                profiler.step()
            if step == start_step + 1 and d.main:  # the wait before the first log: data, compile, warm-up
                print(f"first step done: step {step} after {time.perf_counter() - started:.1f} s", flush=True)

            log_now = step % t.log_every == 0 or step == t.steps
            if log_now:
                gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                loss_val, gn_val = _all_reduce_mean([float(loss_sum), float(gn)], d)
                now = time.perf_counter()
                tok_s = (step - tick_step) * t.global_batch_tokens / max(now - tick, 1e-9)
                tick, tick_step = now, step
                rec = {
                    "step": step,
                    "loss": loss_val,
                    "lr": lr,
                    "grad_norm": gn_val,
                    "tokens": step * t.global_batch_tokens,
                    "tokens_per_s": tok_s,
                    "mfu": tok_s * fpt / (peak * d.world_size) if peak else None,
                }
                if isinstance(train_data, Mixture):  # what each source has given so far
                    drawn = train_data.samples_by_source(t.seed, step * spec.global_batch_seqs)
                    rec["tokens_by_source"] = {
                        n: k * m.seq_len for n, k in zip(train_data.names, drawn, strict=True)
                    }
                last_loss = loss_val
                clock.tick(step, rec["tokens"])  # before log(): a cloud run's push carries both
                log(rec)
                if d.main:
                    fault_point("train.logged")  # tests: a preemption right after a step reached the store
                if auto:
                    choose_interval(auto, step, t.global_batch_tokens / max(tok_s, 1e-9), d, clock)
            paused = time.perf_counter()  # evaluation and checkpoints do not count against tokens/s
            with clock.phase("evaluating"):
                if step % t.eval_every == 0 or step == t.steps:
                    last_val, bpb = evaluate(model, val_batches, autocast, d, bytes_of)
                    log(
                        {
                            "step": step,
                            "val_loss": last_val,
                            "val_ppl": math.exp(min(last_val, 50.0)),
                            "val_bpb": bpb,
                        }
                    )
                    if t.samples:  # every rank: a sharded model gathers its weights on all of them
                        log(
                            {"step": step, "samples": samples(raw, tok, t.samples, t.sample_tokens, d.device)}
                        )
                if tasks and (step % (t.evals_every or t.eval_every) == 0 or step == t.steps):
                    scores = {
                        name: score_task(
                            model, tok, examples, m.seq_len, d.device, autocast, d.rank, d.world_size
                        )
                        for name, examples in tasks.items()
                    }
                    log({"step": step, "evals": scores})
            asked = stop_at is not None and step >= stop_at  # the same on every rank
            if should_stop:  # every step, whatever log_every: a stop is acted on within one step
                asked = _any_rank(should_stop(), d) or asked
            stop_requested = asked and step < t.steps
            if stop_requested:
                log({"step": step, "stop": "requested", "step_s": round(paused - step_began, 3)})
            # At most one save is in flight (the next waits for it), and training goes on while it uploads:
            # a crash redoes the steps since the newest commit, fewer than two checkpoint intervals.
            due = auto.due(step) if auto else step % t.checkpoint_every == 0
            if due or step == t.steps or stop_requested:
                with clock.phase("checkpointing"):
                    state.save(step)
                if auto:
                    auto.saved(step)
            tick += time.perf_counter() - paused
            if stop_requested:
                break
        with clock.phase("checkpointing"):
            state.close()  # the last upload: a run ends once its last step is committed
        clock.end(step, step * t.global_batch_tokens, stopped=stop_requested)
    finally:
        try:
            state.close()  # re-raises a failed async save: the run must not end as if it were saved
        finally:
            metrics.close()
    return TrainResult(step=step, loss=last_loss, val_loss=last_val, stopped=stop_requested)


def choose_interval(auto: AutoCheckpoints, step: int, step_s: float, d: Dist, clock: Clock) -> None:
    """checkpoint_every=auto at a log step: rank 0 (the one that writes, so the one that measures a commit)
    decides the interval from its step time and checkpoint cost, and every rank takes it: a save under FSDP
    is a collective, so all ranks must save at the same step."""
    changed = auto.update(step_s) if d.main else False
    if d.world_size > 1:
        shared = torch.tensor([auto.every or 0], dtype=torch.int64, device=d.device)
        dist.broadcast(shared, src=0)
        auto.every = int(shared.item()) or None
    if changed and auto.interval is not None:
        i, measured = auto.interval, "measured" if auto.measured_s is not None else "estimated"
        clock.note(
            "interval",
            step=step,
            every=auto.every,
            seconds=round(i.seconds, 3),
            cost_s=round(i.cost_s, 3),
            cost=measured,
            mtbf_s=round(i.mtbf_s, 1),
            step_s=round(step_s, 4),
        )
        print(f"checkpoint every {auto.every} steps: {i.explain()} ({measured} cost)", flush=True)


def train_step(model: nn.Module, raw: Decoder, opt, sched, micro_batches, autocast, t) -> tuple:
    """One optimizer step over a rank's micro-batches: (mean loss, grad norm, lr), as device tensors.

    Each micro-batch's loss is the only tensor kept from its forward; nothing is read back to the host
    here, so the GPU runs ahead of Python.
    """
    accum = len(micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        with _no_sync(model, raw, last_micro=i == accum - 1):
            with phase("forward"), autocast():
                loss = model(x, y)
            with phase("backward"):
                (loss / accum).backward()
        loss_sum += loss.detach()
    with phase("optimizer"):
        grad_norm = (
            nn.utils.clip_grad_norm_(raw.parameters(), t.grad_clip) if t.grad_clip > 0 else _grad_norm(raw)
        )
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return loss_sum / accum, grad_norm, lr


def _grad_norm(model: nn.Module) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)


def open_data(spec: RunSpec, seq_len: int) -> tuple[TokenDataset | Mixture, TokenDataset | Mixture]:
    """(train, val) of the staged dataset, or of every source of data.mixture, drawn by weight."""
    d = spec.data
    if not d.mixture:
        staged = fetch_dataset(d.path, data_cache_dir())  # a store URI is cached on this machine once
        return staged.dataset("train", seq_len), staged.dataset("val", seq_len)
    if unstaged := [s.dataset for s in d.mixture if not s.path]:
        raise ConfigError(f"mixture source(s) {', '.join(unstaged)} not staged: lmctl launch stages them")
    sets = [fetch_dataset(s.path, data_cache_dir()) for s in d.mixture]
    weights, names = [s.weight for s in d.mixture], [s.dataset for s in d.mixture]
    train_data, val_data = ([s.dataset(split, seq_len) for s in sets] for split in ("train", "val"))
    return Mixture(train_data, weights, names), Mixture(val_data, weights, names)


def prepare_local_data(spec: RunSpec, run_dir: Path) -> RunSpec:
    """For a plain process without staging: tokenize `data.dataset` (a jsonl file) into run_dir/data once."""
    from model.shards import prepare_dataset, read_jsonl_texts
    from model.tokenizer import Tokenizer

    out = run_dir / "data"
    if not (out / "manifest.json").exists():
        texts = list(read_jsonl_texts(spec.data.dataset, spec.data.text_field))
        if spec.data.tokenizer == "train":
            tok = Tokenizer.train(texts, spec.model.vocab_size)
        else:
            tok = Tokenizer.load(spec.data.tokenizer)
        prepare_dataset(texts, tok, out, spec.data.shard_tokens, spec.data.val_fraction, spec.data.dataset)
    return spec.model_copy(update={"data": spec.data.model_copy(update={"path": str(out)})})


def main(argv: list[str] | None = None, prog: str = "python -m model.train") -> int:
    """Train in this process; also `lmctl train`, which hands its arguments here unparsed."""
    what = "Train in this process (no Ray), resuming from the newest committed checkpoint in the run dir."
    ap = argparse.ArgumentParser(prog=prog, description=what)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="preset name or YAML path (as for lmctl launch); data is prepared here")
    src.add_argument("--run-config", metavar="FILE", help="a run's resolved config.yaml (what workers read)")
    ap.add_argument("--run-dir", required=True, help="run directory: checkpoints/, metrics.jsonl")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="train.steps=50")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--stop-at", type=int, default=None, help="stop with a checkpoint after this step")
    ap.add_argument(
        "--profile",
        type=positive_int,
        default=0,
        metavar="N",
        help="profile N steps (after 2 warm-up steps) into <run-dir>/profile, then stop: trace.json "
        "(Perfetto), memory_snapshot.pickle on a GPU (pytorch.org/memory_viz), summary.txt; "
        "forward/backward/optimizer are NVTX ranges for nsys",
    )
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    launch = {"began": time.time(), "staging_s": 0.0}
    try:
        if args.run_config:
            spec = load_spec(args.run_config)
            if args.override:
                spec = resolve(args.run_config, args.override)
        else:
            spec = resolve(args.config, args.override)
            if spec.data.path:
                staged_manifest(spec.data.path)  # is it staged? checked before writing anything
            run_dir.mkdir(parents=True, exist_ok=True)
            if not spec.data.path:
                t0 = time.perf_counter()
                spec = prepare_local_data(spec, run_dir)
                launch["staging_s"] = time.perf_counter() - t0
            spec.write(run_dir)
    except (ConfigError, ValueError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    stop = {"flag": False}

    def on_stop(signum, frame):
        """SIGTERM or a first Ctrl-C: finish the step, checkpoint, exit. A second Ctrl-C aborts at once."""
        stop["flag"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if signum == signal.SIGINT:
            print("stopping after a checkpoint at the end of this step (Ctrl-C again to abort)", flush=True)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    try:
        result = train(
            spec,
            run_dir,
            device=args.device,
            stop_at=args.stop_at,
            should_stop=lambda: stop["flag"],
            profile_steps=args.profile,
            launch=launch,
        )
    except (ConfigError, StoreError, CheckpointError, OSError) as e:  # a full disk says so, in one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"{'stopped' if result.stopped else 'finished'} at step {result.step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
