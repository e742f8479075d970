"""The GPU check: one command that proves the GPU path correct and measures how fast the 1b step runs.

    python -m bench.gpu_check                       # one H100/H200: ~8 minutes, start-up and compiles in
    python -m bench.gpu_check --only env,attention  # some stages
    python -m bench.gpu_check --device cpu --small  # the same code paths at toy sizes, on any machine

Each stage runs in its own process under a time box (a hang or an out-of-memory cannot take the others down)
and records its figures as it goes, so a stage cut short still reports what it measured. Stages, in order:

  env         GPU, driver, torch/CUDA/cuDNN; the ceilings measured here: bf16 matmul TFLOP/s, copy GB/s
  cuda_paths  bf16 autocast, CUDA RNG save/restore, pinned-memory batches, nccl on one rank, FSDP2 with its
              mixed-precision policy, DDP, and train() itself on CUDA with parallel=ddp and parallel=fsdp
  throughput  1b at seq 2048 through model.train.train_step: tokens/s, MFU, peak memory against the plan, for
              activation checkpointing none/selective/full, micro-batch 4-32, compiled or eager
  attention   SDPA backends on the 1b attention shape (GQA and expanded K/V), which one runs by default;
              the chunked loss against a full-logits cross-entropy
  rtx5090     the 1b step inside 32 GB (torch.cuda.set_per_process_memory_fraction): fits, peak vs plan
  resume      train() on CUDA at the 1b width (2 layers): stop, resume, losses against an uninterrupted run
  stall       the checkpoint stall as train() sees it (file:// store), per save and per step
  pytest      the CUDA tests: pytest -m gpu
  generate    greedy generation of 124m and 1b in bf16 with and without the KV cache (bench.generate_speed)

Results: bench/results/gpu_check.json (and $OUT/gpu_check.json when OUT is set); a summary is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench._common import RESULTS_DIR, environment

REPO = Path(__file__).resolve().parent.parent
# (stage, seconds at most); the order is the priority: what matters most runs first
STAGES: list[tuple[str, int]] = [
    ("env", 30),
    ("cuda_paths", 60),
    ("throughput", 210),
    ("attention", 35),
    ("rtx5090", 60),
    ("pytest", 90),
    ("resume", 100),
    ("stall", 80),
    ("generate", 60),
]
# 1b throughput variants: (activation checkpointing, micro-batch, compiled, precision), most telling first:
# the plan's choice for an H200 and for an 80 GB H100, then the alternatives
THROUGHPUT_VARIANTS = [
    ("none", 32, True, "bf16"),
    ("none", 16, True, "bf16"),
    ("none", 2, True, "fp32"),
    ("none", 8, True, "bf16"),
    ("selective", 16, True, "bf16"),
    ("full", 16, True, "bf16"),
    ("none", 8, False, "bf16"),
]
RTX5090_VARIANTS = [("none", 2, True, "bf16"), ("selective", 4, True, "bf16"), ("full", 8, True, "bf16")]


# ---------------------------------------------------------------- recording


class Recorder:
    """A stage's results, rewritten to its file after every update so that a killed stage still reports."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def append(self, key: str, value) -> None:
        self.data.setdefault(key, []).append(value)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def attempt(rec: Recorder, key: str, fn: Callable[[], object]) -> None:
    """Run one check; its result or its error (one line plus the last frames) is recorded under key."""
    t0 = time.perf_counter()
    try:
        out = fn()
        rec[key] = {"ok": True, "s": round(time.perf_counter() - t0, 2), **(out or {})}
    except Exception as e:  # a check that fails is a finding, not the end of the stage
        tb = traceback.format_exc().splitlines()[-6:]
        rec[key] = {
            "ok": False,
            "s": round(time.perf_counter() - t0, 2),
            "error": f"{type(e).__name__}: {e}"[:600],
            "trace": tb,
        }
        print(f"  {key}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        _free_cuda()


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- shared helpers


def _device(args) -> str:
    return "cuda" if args.device == "cuda" else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median time of fn (device-synchronised), after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def staged_corpus(out: Path, vocab: int = 2048) -> str:
    """The shipped corpus, tokenized and packed into a staged folder (what train() reads)."""
    from model.config import DEFAULT_CORPUS
    from model.shards import prepare_dataset, read_jsonl_texts
    from model.tokenizer import Tokenizer

    if not (out / "manifest.json").exists():
        texts = list(read_jsonl_texts(DEFAULT_CORPUS))
        prepare_dataset(texts, Tokenizer.train(texts, vocab), out, 1 << 20, 0.05, "shakespeare")
    return str(out)


def one_b(args, *overrides: str):
    """The 1b preset (or a toy shape with --small) with overrides."""
    from model.config import resolve

    small = (
        [
            "model.vocab_size=2048",
            "model.d_model=128",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.d_ff=256",
            "model.seq_len=128",
            "train.global_batch_tokens=1024",
            "train.micro_batch_size=1",
        ]
        if args.small
        else []
    )
    return resolve("1b", [*small, *overrides])


# ---------------------------------------------------------------- stages


def stage_env(args, rec: Recorder) -> None:
    import torch

    rec["environment"] = environment()
    rec["torch"] = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if not torch.cuda.is_available():
        rec["gpu"] = None
        return
    p = torch.cuda.get_device_properties(0)
    rec["gpu"] = {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "memory_bytes": p.total_memory,
        "sms": p.multi_processor_count,
    }
    try:
        q = "name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        rec["nvidia_smi"] = {"fields": q, "value": smi.stdout.strip()}
    except (OSError, subprocess.TimeoutExpired) as e:
        rec["nvidia_smi"] = {"error": str(e)}

    def matmul():
        out = {}
        for n in (4096, 8192):
            sets = [
                (
                    torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
                    torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
                )
                for _ in range(3)
            ]
            i = iter(range(10**9))
            s = median_seconds(lambda sets=sets, i=i: torch.mm(*sets[next(i) % 3]), reps=30, warmup=5)
            out[f"bf16_{n}_tflops"] = 2 * n**3 / s / 1e12
        return out

    def copy():
        n = 1 << 30  # 2 GiB of bf16 each way
        a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        b = torch.empty_like(a)
        s = median_seconds(lambda: b.copy_(a), reps=20, warmup=3)
        return {"d2d_gbps": 2 * a.numel() * 2 / s / 1e9}

    attempt(rec, "matmul", matmul)
    attempt(rec, "copy", copy)


def stage_cuda_paths(args, rec: Recorder) -> None:
    import torch

    from model.checkpoint import rng_state, set_rng_state
    from model.config import resolve
    from model.data import _to_batch
    from model.decoder import Decoder

    dev = _device(args)
    spec = resolve("tiny")

    def autocast_bf16():
        torch.manual_seed(0)
        m = Decoder(spec.model).to(dev)
        x = torch.randint(0, spec.model.vocab_size, (2, 64), device=dev)
        with torch.autocast(dev, dtype=torch.bfloat16):
            logits, loss = m(x), m(x, x)
        loss.backward()
        finite = all(torch.isfinite(p.grad).all().item() for p in m.parameters())
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and finite
        return {"loss": loss.item()}

    def rng():
        torch.randn(1, device=dev)  # the generator exists
        saved = rng_state()
        a = torch.randn(8, device=dev)
        torch.randn(100, device=dev)
        set_rng_state(saved)
        b = torch.randn(8, device=dev)
        assert torch.equal(a, b), "the CUDA RNG did not come back"
        cuda = saved.get("cuda")
        return {"cuda_state": None if cuda is None else type(cuda).__name__}

    def pinned():
        import numpy as np

        tokens = np.random.default_rng(0).integers(0, 2048, (4, 129)).astype(np.int64)
        x, y = _to_batch(tokens, dev)
        xc, yc = _to_batch(tokens, "cpu")
        assert torch.equal(x.cpu(), xc) and torch.equal(y.cpu(), yc)
        return {"device": str(x.device)}

    def one_rank_group():
        import socket

        import torch.distributed as dist

        if dist.is_initialized():
            return {"backend": dist.get_backend()}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if dev == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=1,
            device_id=torch.device("cuda", 0) if dev == "cuda" else None,
        )
        t = torch.ones(4, device=dev)
        dist.all_reduce(t)
        assert t.sum().item() == 4
        return {"backend": backend}

    def fsdp2():
        from model.optim import build_optimizer
        from model.train import shard_fsdp

        one_rank_group()
        torch.manual_seed(0)
        ref = Decoder(spec.model).to(dev)
        torch.manual_seed(0)
        m = Decoder(spec.model).to(dev)
        shard_fsdp(m, bf16=True)
        seen = []
        m.layers[0].mlp.down_proj.register_forward_pre_hook(lambda mod, a: seen.append(mod.weight.dtype))
        x = torch.randint(0, spec.model.vocab_size, (4, 64), device=dev)
        with torch.autocast(dev, dtype=torch.bfloat16):
            want = ref(x, x).item()
        opt = build_optimizer(m, spec.train)
        losses = []
        for _ in range(3):
            loss = m(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert str(seen[0]) == "torch.bfloat16", f"FSDP2 computed in {seen[0]}"
        assert all(map(math.isfinite, losses)), f"losses {losses}"
        assert abs(losses[0] - want) < 0.05, f"first loss {losses[0]} against autocast's {want}"
        return {"losses": losses, "autocast_loss": want, "param_dtype_in_forward": str(seen[0])}

    def ddp():
        from model.optim import build_optimizer

        one_rank_group()
        torch.manual_seed(0)
        m = Decoder(spec.model).to(dev)
        w = torch.nn.parallel.DistributedDataParallel(
            m, device_ids=[0] if dev == "cuda" else None, gradient_as_bucket_view=True
        )
        opt = build_optimizer(m, spec.train)
        x = torch.randint(0, spec.model.vocab_size, (4, 64), device=dev)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = w(x, x)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    def train_loops():
        from model.metrics import read_metrics
        from model.train import train

        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            data = staged_corpus(Path(tmp) / "data")
            for parallel in ("ddp", "fsdp"):
                s = resolve(
                    "tiny",
                    [
                        f"data.path={data}",
                        "train.steps=6",
                        "train.log_every=1",
                        "train.eval_every=3",
                        "train.checkpoint_every=3",
                        f"train.parallel={parallel}",
                    ],
                )
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                run = Path(tmp) / parallel
                t0 = time.perf_counter()
                res = train(s, run, device=dev)
                losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
                out[parallel] = {
                    "step": res.step,
                    "losses": losses,
                    "s": time.perf_counter() - t0,
                    "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
                }
        # the same model and data: one-GPU FSDP must train like DDP, in bf16 (its losses match DDP's closely)
        gap = max(abs(a - b) for a, b in zip(out["ddp"]["losses"], out["fsdp"]["losses"], strict=True))
        out["max_loss_gap"] = gap
        assert gap < 0.05, f"fsdp and ddp losses differ by {gap}"
        return out

    for key, fn in [
        ("autocast_bf16", autocast_bf16),
        ("rng", rng),
        ("pinned", pinned),
        ("one_rank_group", one_rank_group),
        ("fsdp2", fsdp2),
        ("ddp", ddp),
        ("train", train_loops),
    ]:
        attempt(rec, key, fn)


def _plan_bytes(spec, level: str, mb: int) -> int | str:
    """What model/memory.py predicts torch.cuda.max_memory_allocated() shows for this config (one GPU)."""
    try:
        from model.memory import step_memory, strategy_name

        return step_memory(spec, strategy_name("ddp", level), 1, mb, 1 << 40).allocated
    except Exception as e:  # the model's own errors are findings too
        return f"error: {e}"


def _throughput(args, rec: Recorder, variants, key: str) -> None:
    """Time optimizer steps of the 1b config through train_step, one variant after another."""
    import torch

    from model.config import flops_per_token
    from model.decoder import Decoder
    from model.hardware import peak_flops
    from model.optim import build_optimizer, build_scheduler
    from model.train import train_step

    dev = _device(args)
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.automatic_dynamic_shapes = False  # each micro-batch size gets static kernels
    if dev == "cuda":
        torch.set_float32_matmul_precision("high")
    peak = peak_flops(torch.cuda.get_device_name()) if dev == "cuda" else None
    ceiling = args.ceiling_tflops * 1e12 if args.ceiling_tflops else None
    accum, warm, timed = (2, 2, 3) if not args.small else (1, 1, 2)
    raw = opt = sched = None
    compiled_now = None
    for level, mb, compiled, precision in variants:
        spec = one_b(
            args,
            f"train.micro_batch_size={mb}",
            f"train.activation_checkpointing={level}",
            f"train.global_batch_tokens={mb * accum * (128 if args.small else 2048)}",
            f"train.compile={str(compiled).lower()}",
            f"train.precision={precision}",
        )
        m = spec.model
        row = {
            "checkpointing": level,
            "micro_batch": mb,
            "compile": compiled,
            "precision": precision,
            "accum": accum,
            "plan_bytes": _plan_bytes(spec, level, mb),
        }
        t0 = time.perf_counter()
        try:
            if raw is None or (compiled, precision) != compiled_now:
                raw = opt = sched = None
                _free_cuda()
                torch.manual_seed(0)
                raw = Decoder(m).to(dev)
                if compiled:
                    raw.compile_blocks()
                opt = build_optimizer(raw, spec.train)
                sched = build_scheduler(opt, spec.train)
                compiled_now = compiled, precision
            raw.set_activation_checkpointing(level)
            g = torch.Generator(device="cpu").manual_seed(mb)
            batches = [
                (lambda tok: (tok[:, :-1].to(dev), tok[:, 1:].to(dev)))(
                    torch.randint(0, m.vocab_size, (mb, m.seq_len + 1), generator=g)
                )
                for _ in range(accum)
            ]
            bf16 = dev == "cuda" and precision == "bf16"
            autocast = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            losses = []
            for _ in range(warm):
                loss, _, _ = train_step(raw, raw, opt, sched, batches, autocast, spec.train)
                losses.append(float(loss))
            row["warmup_s"] = time.perf_counter() - t0
            _sync()
            t1 = time.perf_counter()
            for _ in range(timed):
                loss, _, _ = train_step(raw, raw, opt, sched, batches, autocast, spec.train)
            losses.append(float(loss))  # syncs
            step_s = (time.perf_counter() - t1) / timed
            tok_s = mb * accum * m.seq_len / step_s
            fpt = flops_per_token(m)
            row |= {
                "step_s": step_s,
                "tokens_per_s": tok_s,
                "losses": losses,
                "tflops": tok_s * fpt / 1e12,
                "mfu": tok_s * fpt / peak if peak else None,
                "of_ceiling": tok_s * fpt / ceiling if ceiling else None,
            }
            if dev == "cuda":
                row |= {
                    "peak_bytes": torch.cuda.max_memory_allocated(),
                    "peak_reserved": torch.cuda.max_memory_reserved(),
                }
            print(
                f"  {key} {level:9s} mb={mb:<3d} compile={compiled!s:5s} {precision} {tok_s:10.0f} tok/s "
                f"mfu={row['mfu'] or 0:.3f} peak={row.get('peak_bytes', 0) / 2**30:.1f} GiB "
                f"plan={row['plan_bytes'] / 2**30 if isinstance(row['plan_bytes'], int) else '-'}",
                flush=True,
            )
        except torch.OutOfMemoryError as e:
            row |= {"oom": True, "error": str(e).splitlines()[0][:300]}
            print(f"  {key} {level} mb={mb}: out of memory", flush=True)
            raw = opt = sched = None
            _free_cuda()
        except Exception as e:
            row |= {
                "error": f"{type(e).__name__}: {e}"[:600],
                "trace": traceback.format_exc().splitlines()[-8:],
            }
            print(f"  {key} {level} mb={mb}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            raw = opt = sched = None
            _free_cuda()
        row["s"] = time.perf_counter() - t0
        rec.append(key, row)


def stage_throughput(args, rec: Recorder) -> None:
    from model.config import flops_per_token

    rec["flops_per_token"] = flops_per_token(one_b(args).model)
    _record_choice(args, rec)
    _throughput(args, rec, THROUGHPUT_VARIANTS if not args.small else THROUGHPUT_VARIANTS[:3], "variants")


def _record_choice(args, rec: Recorder) -> None:
    """What `activation_checkpointing: auto` picks for the memory this stage has."""
    import torch

    from model.memory import choose

    total = rec.data.get("plan_gpu_bytes") or (
        torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 32 << 30
    )
    rec["auto_choice"] = choose(one_b(args), 1, total)


def stage_rtx5090(args, rec: Recorder) -> None:
    import torch

    from orchestrator.gpus import CATALOG

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        # An RTX 5090 reports 32607 MiB; its CUDA context (~0.5 GiB) lives outside the allocator's fraction
        budget = (32607 - 512) * 2**20
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
        rec["memory_fraction"] = budget / total
        rec["allocator_budget_bytes"] = budget
        rec["plan_gpu_bytes"] = CATALOG["RTX5090"].memory_gb << 30  # what the plan assumes for the card
    _record_choice(args, rec)
    _throughput(args, rec, RTX5090_VARIANTS if not args.small else RTX5090_VARIANTS[:1], "variants")


def stage_attention(args, rec: Recorder) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = _device(args)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    B, H, KV, T, D = (8, 32, 8, 2048, 64) if not args.small else (2, 4, 2, 128, 32)
    rec["shape"] = {"B": B, "H": H, "KV": KV, "T": T, "D": D, "dtype": str(dt)}
    flops = 2 * 2 * B * H * T * T * D / 2 * 3.5  # causal: half the scores; backward ~2.5x forward

    def inputs():
        g = torch.Generator(device=dev).manual_seed(0)
        mk = lambda h: torch.randn(B, h, T, D, device=dev, dtype=dt, generator=g).requires_grad_()
        return mk(H), mk(KV), mk(KV)

    def run(backends, expand: bool):
        q, k, v = inputs()
        rep = H // KV

        def step():
            kk, vv = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if expand else (k, v)
            ctx = sdpa_kernel(backends) if backends else contextlib.nullcontext()
            with ctx:
                y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not expand)
            y.sum().backward()

        s = median_seconds(step, reps=10, warmup=2)
        return {"ms": s * 1e3, "tflops": flops / s / 1e12}

    candidates = [
        ("default_gqa", None, False),
        ("flash_gqa", [SDPBackend.FLASH_ATTENTION], False),
        ("cudnn_expand", [SDPBackend.CUDNN_ATTENTION], True),
        ("flash_expand", [SDPBackend.FLASH_ATTENTION], True),
        ("efficient_expand", [SDPBackend.EFFICIENT_ATTENTION], True),
        ("default_expand", None, True),
        ("efficient_gqa", [SDPBackend.EFFICIENT_ATTENTION], False),
        ("cudnn_gqa", [SDPBackend.CUDNN_ATTENTION], False),
    ]
    for name, backends, expand in candidates:
        attempt(rec, name, lambda b=backends, e=expand: run(b, e))

    def default_kernels():
        from torch.profiler import ProfilerActivity, profile

        q, k, v = inputs()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            y.sum().backward()
            _sync()
        names = sorted(
            {
                e.key
                for e in prof.key_averages()
                if any(
                    w in e.key.lower() for w in ("flash", "cudnn", "efficient", "fmha", "attention", "math")
                )
            }
        )
        return {"ops_and_kernels": names[:20]}

    attempt(rec, "default_kernels", default_kernels)

    def loss_compare():
        from model.decoder import Linear, linear_cross_entropy

        N, d, V = (16384, 2048, 32768) if not args.small else (512, 64, 2048)
        head = Linear(d, V).to(dev)
        x = torch.randn(N, d, device=dev, requires_grad=True)
        y = torch.randint(0, V, (N,), device=dev)
        out = {}
        for name, fn in (
            ("full", lambda: F.cross_entropy(head(x).float(), y)),
            ("fused", lambda: linear_cross_entropy(x, head.weight, y)),
        ):

            def step(fn=fn):
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                    loss = fn()
                loss.backward()
                return loss

            step()
            _sync()
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            s = median_seconds(step, reps=5, warmup=1)
            out[name] = {
                "ms": s * 1e3,
                "peak_extra_bytes": torch.cuda.max_memory_allocated() - base if dev == "cuda" else None,
            }
            x.grad = None
            head.weight.grad = None
        return out

    attempt(rec, "loss", loss_compare)


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=False))


@contextlib.contextmanager
def deterministic_kernels():
    """Deterministic CUDA kernels and the math attention backend, for bit-for-bit comparisons of two runs."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.use_deterministic_algorithms(False)


def stage_resume(args, rec: Recorder) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: deterministic GEMMs
    import torch

    from model.metrics import read_metrics
    from model.train import train

    dev = _device(args)
    with tempfile.TemporaryDirectory() as tmp:
        data = staged_corpus(Path(tmp) / "data")
        width = [] if args.small else ["model.n_layers=2"]
        spec = one_b(
            args,
            *width,
            f"data.path={data}",
            "train.steps=6",
            "train.log_every=1",
            "train.eval_every=3",
            "train.eval_batches=2",
            "train.checkpoint_every=100",
            "train.keep_checkpoints=1",
            "train.warmup_steps=2",
            "train.compile=false",
            "train.activation_checkpointing=none",
            # two micro-batches a step: the resume crosses a gradient accumulation boundary
            f"train.global_batch_tokens={2 * (1 if args.small else 4) * (128 if args.small else 2048)}",
        )
        rec["config"] = {
            "n_layers": spec.model.n_layers,
            "d_model": spec.model.d_model,
            "micro_batch": spec.train.micro_batch_size,
            "seq_len": spec.model.seq_len,
        }

        def losses(run):
            return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

        def straight():
            t0 = time.perf_counter()
            train(spec, Path(tmp) / "a", device=dev)
            return {"losses": losses(Path(tmp) / "a"), "s": time.perf_counter() - t0}

        def stopped_and_resumed(name="b"):
            run = Path(tmp) / name
            first = train(spec, run, device=dev, stop_at=3)
            second = train(spec, run, device=dev)
            return {"stopped_at": first.step, "finished_at": second.step, "losses": losses(run)}

        # Deterministic kernels first: there a correct resume is bit-identical on CUDA too, so any difference
        # is a resume bug rather than the noise of attention's and embedding's atomics-based backward.
        def deterministic_pair():
            with deterministic_kernels():
                a = (train(spec, Path(tmp) / "da", device=dev), losses(Path(tmp) / "da"))[1]
                b = stopped_and_resumed("db")["losses"]
            diffs = [abs(x - y) for x, y in zip(a, b, strict=False)]
            return {
                "bit_identical": a == b,
                "max_abs_diff": max(diffs),
                "diffs": diffs,
                "straight": a,
                "resumed": b,
            }

        attempt(rec, "deterministic", deterministic_pair)
        attempt(rec, "straight", straight)
        attempt(rec, "resumed", stopped_and_resumed)
        a, b = rec.data.get("straight", {}).get("losses"), rec.data.get("resumed", {}).get("losses")
        if a and b:
            rec["bit_identical"] = a == b
            rec["max_abs_diff"] = max_diff(a, b)
            if a != b:  # the noise floor: a second uninterrupted run
                train(spec, Path(tmp) / "c", device=dev)
                rec["noise_floor"] = max_diff(a, losses(Path(tmp) / "c"))
        if dev == "cuda":
            rec["peak_bytes"] = torch.cuda.max_memory_allocated()


def stage_stall(args, rec: Recorder) -> None:
    from model.train import train

    dev = _device(args)
    with tempfile.TemporaryDirectory() as tmp:
        data = staged_corpus(Path(tmp) / "data")
        width = [] if args.small else ["model.n_layers=2"]
        base = [
            *width,
            f"data.path={data}",
            "train.steps=10",
            "train.log_every=1",
            "train.eval_every=1000",
            "train.keep_checkpoints=2",
            "train.compile=false",
            "train.activation_checkpointing=none",
            f"train.micro_batch_size={1 if args.small else 4}",
            f"train.global_batch_tokens={(1 if args.small else 4) * (128 if args.small else 2048)}",
        ]
        for name, every in (("no_saves", 1000), ("save_every_4", 4)):
            spec = one_b(args, *base, f"train.checkpoint_every={every}")
            stamps = []

            def on_log(r, stamps=stamps):
                if "loss" in r:
                    stamps.append(time.perf_counter())

            root = Path(tmp) / name / "store"
            t0 = time.perf_counter()
            train(spec, Path(tmp) / name, device=dev, on_log=on_log, checkpoints=f"file://{root}")
            total = time.perf_counter() - t0
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            med = statistics.median(gaps)
            rec[name] = {
                "train_s": total,
                "step_gaps_s": gaps,
                "median_step_s": med,
                "excess_s": sum(g - med for g in gaps if g > med),
            }
        state_bytes = sum(
            f.stat().st_size
            for f in (Path(tmp) / "save_every_4").rglob("*")
            if f.is_file() and "step_" in str(f)
        )
        rec["store_bytes_kept"] = state_bytes
        a, b = rec.data["no_saves"], rec.data["save_every_4"]
        rec["stall_per_save_s"] = (b["excess_s"] - a["excess_s"]) / 2  # saves at 4 and 8 fall inside the log
        rec["auto"] = auto_interval(args, base, Path(tmp) / "auto")


def auto_interval(args, base: list[str], run: Path) -> dict:
    """checkpoint_every=auto on this device: the commit time the loop measured, the interval it chose from
    it (a short MTBF so it chooses within 10 steps), and the loop's seconds by state (model/timeline.py)."""
    from model.timeline import read_timeline
    from model.train import train

    spec = one_b(args, *base, "train.checkpoint_every=auto", "train.mtbf_hours=0.01")
    train(spec, run, device=_device(args), checkpoints=f"file://{run / 'store'}")
    events = read_timeline(run / "timeline.jsonl")
    return {
        "intervals": [e for e in events if e["event"] == "interval"],
        "end": next((e for e in reversed(events) if e["event"] == "end"), None),
    }


def stage_generate(args, rec: Recorder) -> None:
    import torch

    from bench.generate_speed import measure
    from model.config import resolve

    dev = _device(args)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for name, new_tokens in [("tiny", 32)] if args.small else [("124m", 256), ("1b", 256)]:
        cfg = resolve(name).model
        attempt(rec, name, lambda cfg=cfg, n=new_tokens: measure(cfg, dev, dtype, new_tokens=n, reps=3))
        _free_cuda()


def stage_pytest(args, rec: Recorder) -> None:
    # A bare GPU box may lack the cloud side (sky, moto): the modules it cannot import are reported, not fatal
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rfEs",
        "-m",
        "gpu",
        "--continue-on-collection-errors",
        "tests",
    ]
    log = Path(args.stage_out).with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        try:
            rec["returncode"] = proc.wait(timeout=max(5, args.stage_budget - 8))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rec["returncode"] = "timed out"
    tail = log.read_text(errors="replace")[-6000:]
    rec["tail"] = tail
    lines = [ln for ln in tail.splitlines() if ln.startswith(("FAILED", "ERROR")) or " passed" in ln]
    rec["summary"] = lines[-30:]


STAGE_FUNCS = {
    "env": stage_env,
    "cuda_paths": stage_cuda_paths,
    "throughput": stage_throughput,
    "attention": stage_attention,
    "rtx5090": stage_rtx5090,
    "resume": stage_resume,
    "stall": stage_stall,
    "pytest": stage_pytest,
    "generate": stage_generate,
}


# ---------------------------------------------------------------- the parent


def run_stages(args) -> dict:
    names = args.only.split(",") if args.only else [n for n, _ in STAGES]
    budgets = dict(STAGES)
    unknown = [n for n in names if n not in budgets]
    if unknown:
        sys.exit(f"error: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(budgets)}")
    deadline = time.monotonic() + args.budget
    results: dict = {"stages": {}, "budget_s": args.budget, "device": args.device, "small": args.small}
    ceiling = None
    # what train() sets up for itself, so that the stages timing train_step directly see the same allocator
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            left = deadline - time.monotonic()
            box = min(budgets[name] * (0.5 if args.small else 1.0) + (60 if args.small else 0), left)
            if box < 10:
                results["stages"][name] = {"skipped": f"{left:.0f} s of the budget left"}
                continue
            out = Path(tmp) / f"{name}.json"
            cmd = [
                sys.executable,
                "-m",
                "bench.gpu_check",
                "--stage",
                name,
                "--stage-out",
                str(out),
                "--device",
                args.device,
                "--stage-budget",
                str(int(box)),
            ]
            if args.small:
                cmd.append("--small")
            if ceiling:
                cmd += ["--ceiling-tflops", str(ceiling)]
            print(f"== {name} (at most {box:.0f} s)", flush=True)
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, cwd=REPO, timeout=box)
                status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = "timed out"
            data = json.loads(out.read_text()) if out.exists() else {}
            data |= {"status": status, "wall_s": round(time.monotonic() - t0, 1)}
            results["stages"][name] = data
            if name == "env":
                ceiling = data.get("matmul", {}).get("bf16_8192_tflops")
            write_results(args, results)
    return results


def write_results(args, results: dict) -> None:
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(
            json.dumps(results, indent=1, default=str) + "\n"
        )


def summary(results: dict) -> None:
    """The table printed last: what ran, and the figures that answer the issue's targets."""
    st = results["stages"]
    print("\n==== GPU check summary")
    for name, data in st.items():
        print(f"{name:11s} {data.get('status', data.get('skipped', '?')):10s} {data.get('wall_s', 0):6.1f} s")
    env = st.get("env", {})
    if env.get("gpu"):
        print(
            f"GPU {env['gpu']['name']}  torch {env['torch']['version']}  CUDA {env['torch']['cuda']}  "
            f"cuDNN {env['torch']['cudnn']}  matmul {env.get('matmul', {}).get('bf16_8192_tflops', 0):.0f} "
            f"TFLOP/s  copy {env.get('copy', {}).get('d2d_gbps', 0):.0f} GB/s"
        )
    bad = [
        f"{k}: {v.get('error')}"
        for k, v in st.get("cuda_paths", {}).items()
        if isinstance(v, dict) and v.get("ok") is False
    ]
    print("cuda paths: " + ("all ok" if not bad and "cuda_paths" in st else "; ".join(bad)[:600]))
    for stage in ("throughput", "rtx5090"):
        for r in st.get(stage, {}).get("variants", []):
            plan = r.get("plan_bytes")
            print(
                f"{stage:10s} {r['checkpointing']:9s} mb={r['micro_batch']:<3d} compile={r['compile']!s:5s} "
                f"{r.get('precision', 'bf16')} "
                + (
                    f"{r['tokens_per_s']:9.0f} tok/s  MFU {r['mfu'] or 0:.3f}  "
                    f"ceiling {r['of_ceiling'] or 0:.3f}  "
                    f"peak {r.get('peak_bytes', 0) / 2**30:5.1f} GiB  plan "
                    f"{plan / 2**30 if isinstance(plan, int) else float('nan'):5.1f} GiB"
                    if "tokens_per_s" in r
                    else ("OOM" if r.get("oom") else r.get("error", "?")[:120])
                )
            )
    for stage in ("throughput", "rtx5090"):
        if st.get(stage, {}).get("auto_choice"):
            print(f"{stage}: activation_checkpointing=auto picks {st[stage]['auto_choice']}")
    att = st.get("attention", {})
    times = {k: v["ms"] for k, v in att.items() if isinstance(v, dict) and "ms" in v}
    if times:
        print(
            "attention fwd+bwd ms: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(times.items(), key=lambda x: x[1]))
        )
    if "loss" in att and att["loss"].get("ok"):
        lo = att["loss"]
        print(
            f"loss fwd+bwd: full logits {lo['full']['ms']:.1f} ms "
            f"({lo['full']['peak_extra_bytes'] or 0:.3g} B), "
            f"fused {lo['fused']['ms']:.1f} ms ({lo['fused']['peak_extra_bytes'] or 0:.3g} B)"
        )
    res = st.get("resume", {})
    if "bit_identical" in res:
        print(
            f"resume: bit-identical {res['bit_identical']}, max diff {res['max_abs_diff']:.3g}, "
            f"noise floor {res.get('noise_floor', 0):.3g}"
        )
    det = res.get("deterministic", {})
    if "bit_identical" in det:
        print(
            f"resume, deterministic kernels: bit-identical {det['bit_identical']}, "
            f"max diff {det['max_abs_diff']:.3g}"
        )
    stall = st.get("stall", {})
    if "stall_per_save_s" in stall:
        print(
            f"checkpoint stall per save {stall['stall_per_save_s']:.2f} s "
            f"(median step {stall['no_saves']['median_step_s']:.3f} s, "
            f"{stall.get('store_bytes_kept', 0) / 1e9:.1f} GB kept)"
        )
    for name, r in st.get("generate", {}).items():
        if isinstance(r, dict) and r.get("ok"):
            print(
                f"generate {name} {r['dtype']}: cached {r['cached']['tokens_per_s']:.0f} tok/s, uncached "
                f"{r['uncached']['tokens_per_s']:.0f} tok/s ({r['cached_vs_uncached']:.2f}x), first token "
                f"{r['cached']['ttft_ms']:.1f} ms"
            )
    if "summary" in st.get("pytest", {}):
        print("pytest: " + " | ".join(st["pytest"]["summary"][-8:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help="toy shapes: try every code path in seconds")
    p.add_argument("--only", help=f"comma list of stages from {', '.join(n for n, _ in STAGES)}")
    p.add_argument("--budget", type=int, default=520, help="seconds for all stages together")
    p.add_argument("--json", default=str(RESULTS_DIR / "gpu_check.json"))
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-out", help=argparse.SUPPRESS)
    p.add_argument("--stage-budget", type=int, default=60, help=argparse.SUPPRESS)
    p.add_argument("--ceiling-tflops", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        rec = Recorder(Path(args.stage_out))
        STAGE_FUNCS[args.stage](args, rec)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error(
                "--device cuda: torch sees no CUDA device (use --device cpu --small to try the code paths)"
            )
    results = run_stages(args)
    summary(results)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
