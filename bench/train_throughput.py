"""Training throughput: our Decoder against transformers' LlamaForCausalLM of the same shape, side by side.

Why: model/decoder.py fuses projections and leans on SDPA so that it trains faster than the reference Llama;
this measures by how much on the device at hand. For the ratio to be fair both models compute the same
function from the same weights (HF's are converted from ours by model.export_hf, and their first losses must
agree), see the same batch, take the same loss (one cross-entropy, outside HF's forward) and the same AdamW,
and each is timed in every configuration it supports (eager and torch.compile; HF's "sdpa" and "eager"
attention), so that the best of each is compared.

Achieved FLOP/s = tokens/s x model.config.flops_per_token (one formula for both models). On CUDA it is
divided by the data-sheet bf16 peak (MFU). A CPU has no data-sheet figure that torch can reach, so its peak
is measured in the same run: the best fp32 rate of large square matmuls, by MKL (torch.mm) or by oneDNN,
whichever is faster here (our Decoder's CPU linears use oneDNN where it is, see model/onednn.py; the
"ours-mkl" variant is the same model on torch's default MKL path). Fractions against torch.mm alone are
printed too. The rate at the model's own GEMM shapes is printed as what a step of nothing but its matmuls
would reach.

On CPU the variants, and a torch.mm probe of the peak, are timed in interleaved windows (round robin), so that
a busy machine slows all of them alike; on CUDA they run one after another, one model in GPU memory at a time.
The median window is reported, and the best one, which on a shared machine is the nearer to an idle one.

    python -m bench.train_throughput                      # CPU, ~15M-parameter shape, ~2 minutes on 2 cores
    python -m bench.train_throughput --device cuda        # 1b preset, bf16 autocast, compiled
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench._common import RESULTS_DIR, print_table, write_json
from model import onednn
from model.config import ConfigError, ModelConfig, flops_per_token, human, matmul_params, param_count, resolve
from model.decoder import Decoder
from model.export_hf import hf_config, hf_state_dict
from model.hardware import peak_flops
from model.optim import build_optimizer

VARIANTS = {
    "cpu": ["ours", "ours+compile", "ours-mkl", "hf-sdpa", "hf-sdpa+compile", "hf-eager", "hf-eager+compile"],
    "cuda": ["ours+compile", "hf-sdpa+compile"],  # eager is slower there; ask for it with --variants
}
GOAL_RATIO = 1.15  # ours_best / hf_best tokens/s
GOAL_CPU_FRACTION = 0.9  # ours_best achieved FLOP/s / measured fp32 matmul peak (best of MKL and oneDNN)
# CPU default: a ~15M-parameter shape, spelled out in full so that edits to the tiny preset do not move it.
# Its matmuls are wide enough to run near the machine's peak (tiny's are too narrow for that), and a step on
# 2 idle cores takes about half a second.
CPU_SHAPE = [
    "model.vocab_size=4096",
    "model.d_model=512",
    "model.n_layers=4",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.d_ff=1536",
    "model.seq_len=256",
    "model.tie_embeddings=true",
    "train.micro_batch_size=4",
    "train.global_batch_tokens=1024",
]
PROBE_N = 3072  # side of the square torch.mm timed between the variants' windows on CPU


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", help="preset name or YAML path (default: 1b on cuda; on cpu, see CPU_SHAPE)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="model.n_layers=8")
    p.add_argument("--batch", type=int, help="sequences per step (default: the preset's micro_batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's model.seq_len)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default: 10 cpu, 20 cuda)")
    p.add_argument("--windows", type=int, help="timed windows per variant (default: 10 cpu, 5 cuda)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    p.add_argument("--variants", help=f"comma list from {', '.join(VARIANTS['cpu'])}")
    p.add_argument(
        "--adamw",
        choices=["fused", "foreach", "project"],
        default="project",
        help="AdamW kernel of every variant; project (default): the one model.optim.build_optimizer picks",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both models")
    p.add_argument("--profile", action="store_true", help="print the top ops of one step of each variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(RESULTS_DIR / "train_throughput.json"))
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.config is None:
        args.config = "1b" if cuda else "tiny"
        args.override = ([] if cuda else CPU_SHAPE) + args.override
    args.steps = args.steps or (20 if cuda else 10)
    args.windows = min(args.windows or (5 if cuda else 10), args.steps)
    names = args.variants.split(",") if args.variants else VARIANTS[args.device]
    unknown = [n for n in names if n not in VARIANTS["cpu"]]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS['cpu'])}")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if any(n.startswith("hf") for n in names) and importlib.util.find_spec("transformers") is None:
        print("note: transformers is not installed; the HF comparison is skipped")
        names = [n for n in names if not n.startswith("hf")]
    args.variants = names
    return args


# ---------------------------------------------------------------- the CPU's peak, measured


def best_seconds(fn: Callable[[], object], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    """Fastest of `reps` timed calls after an untimed one: the figure least disturbed by other work."""
    fn()
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_matmul_peak(sizes=(2048, 3072, 4096), reps: int = 3) -> dict[str, float]:
    """Best fp32 FLOP/s of square torch.mm per size."""
    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        rates[str(n)] = 2 * n**3 / best_seconds(lambda a=a, b=b: torch.mm(a, b), reps)
    return rates


def onednn_matmul_peak(sizes=(2048, 3072, 4096), reps: int = 3) -> dict[str, float]:
    """Best fp32 FLOP/s of square matmuls by oneDNN (the kernel model/onednn.py uses), per size; empty when
    oneDNN is not usable here. torch.mm on CPU is MKL's sgemm, which on some CPUs (AMD's) takes a narrower
    vector path than the silicon has."""
    if not onednn.AVAILABLE:
        return {}
    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        rates[str(n)] = 2 * n**3 / best_seconds(lambda a=a, b=b: onednn.mm_nt(a, b), reps)
    return rates


def gemm_shape_rates(cfg: ModelConfig, tokens: int, reps: int = 3) -> list[dict]:
    """FLOP/s of each Linear's forward, input-grad and weight-grad matmul, in the layouts autograd uses."""
    H, KV, D, L = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    linears = [  # (name, in, out, times per step) of every Linear in our Decoder
        ("qkv_proj", cfg.d_model, (H + 2 * KV) * D, L),
        ("o_proj", H * D, cfg.d_model, L),
        ("gate_up_proj", cfg.d_model, 2 * cfg.d_ff, L),
        ("down_proj", cfg.d_ff, cfg.d_model, L),
        ("lm_head", cfg.d_model, cfg.vocab_size, 1),
    ]
    rows = []
    for name, k, n, count in linears:
        x, w, dy = torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)
        row = {"linear": name, "shape": f"{tokens}x{k}->{n}", "count": count, "flops": 2 * tokens * k * n}
        for phase, fn in (
            ("fwd", lambda x=x, w=w: F.linear(x, w)),  # x @ w.T
            ("dgrad", lambda dy=dy, w=w: dy @ w),
            ("wgrad", lambda dy=dy, x=x: dy.t() @ x),
        ):
            row[f"{phase}_s"] = best_seconds(fn, reps)
            row[phase] = row["flops"] / row[f"{phase}_s"]
        rows.append(row)
    return rows


def cpu_peak_report(cfg: ModelConfig, tokens: int) -> dict:
    """Measure and print the CPU's fp32 matmul peak and the rates at our GEMM shapes."""
    mm = cpu_matmul_peak()
    peak = max(mm.values())
    shapes = gemm_shape_rates(cfg, tokens)
    flops = sum(r["count"] * 3 * r["flops"] for r in shapes)
    rate = flops / sum(r["count"] * (r["fwd_s"] + r["dgrad_s"] + r["wgrad_s"]) for r in shapes)
    print("\nfp32 torch.mm, n x n: " + ", ".join(f"n={n} {r / 1e9:.0f}" for n, r in mm.items()) + " GFLOP/s")
    print_table(
        [{**r, **{p: r[p] / 1e9 for p in ("fwd", "dgrad", "wgrad")}} for r in shapes],
        [
            ("our GEMMs (M x K -> N)", "shape", ""),
            ("linear", "linear", ""),
            ("per step", "count", "d"),
            ("fwd GFLOP/s", "fwd", ".0f"),
            ("dgrad", "dgrad", ".0f"),
            ("wgrad", "wgrad", ".0f"),
        ],
    )
    print(
        f"a step's GEMMs at these rates (torch.mm): {rate / 1e9:.0f} GFLOP/s = {rate / peak:.2f} of its peak"
    )
    dnnl = onednn_matmul_peak()
    if dnnl:
        print(
            "fp32 oneDNN matmul, n x n: "
            + ", ".join(f"n={n} {r / 1e9:.0f}" for n, r in dnnl.items())
            + " GFLOP/s"
        )
    return {"matmul_peak": mm, "onednn_peak": dnnl, "gemm_shapes": shapes, "gemm_shape_rate": rate}


# ---------------------------------------------------------------- the variants


@dataclass
class Variant:
    name: str
    step: Callable[[], torch.Tensor]  # one optimizer step on the fixed batch; returns the loss
    first_loss: float = float("nan")
    warmup_s: float = 0.0
    window_s: list[float] = field(default_factory=list)  # seconds per step, one entry per timed window
    cpu_share: list[float] = field(default_factory=list)  # CPU seconds / (threads x wall seconds), per window


def make_optimizer(model: torch.nn.Module, spec, kind: str) -> torch.optim.Optimizer:
    """The project's AdamW (same groups and hyper-parameters), with the kernel chosen by --adamw."""
    opt = build_optimizer(model, spec.train)
    if kind == "project":
        return opt
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in opt.param_groups]
    return torch.optim.AdamW(groups, fused=kind == "fused", foreach=kind == "foreach")


def hf_model(cfg: ModelConfig, attn: str, ours: Decoder, device: torch.device) -> torch.nn.Module:
    """LlamaForCausalLM of our shape with our weights (converted by the project's own HF export)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(**hf_config(cfg, torch.float32, None), attn_implementation=attn)
    with torch.device(device):
        hf = LlamaForCausalLM(hc)
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours.state_dict(), cfg), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"} or (missing and not cfg.tie_embeddings):
        raise RuntimeError(f"HF weights do not line up: missing {missing}, unexpected {unexpected}")
    return hf


def build_variant(name: str, cfg: ModelConfig, spec, batch: torch.Tensor, args) -> Variant:
    """A model of the variant's kind, its optimizer, and a step closure; same seed, so the same weights."""
    device = batch.device
    kind, _, compiled = name.partition("+")
    idx, tgt = batch[:, :-1], batch[:, 1:]
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Decoder(cfg)
    if kind.startswith("ours"):
        model.set_activation_checkpointing(args.checkpointing)
        loss_fn = lambda: model(idx, tgt)
    else:
        model = hf_model(cfg, kind.removeprefix("hf-"), model, device)
        if args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # the loss our Decoder computes, so that both sides do the same work
        loss_fn = lambda: F.cross_entropy(
            model(input_ids=idx, use_cache=False).logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=-1
        )
    model.train()
    if compiled:
        loss_fn = torch.compile(loss_fn)
    opt = make_optimizer(model, spec, args.adamw)
    amp = device.type == "cuda"

    use_onednn = kind != "ours-mkl"

    def step() -> torch.Tensor:
        onednn.ENABLED = use_onednn  # variants interleave: each sets the path it is about
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return Variant(name, step)


def warm_up(v: Variant, steps: int, sync: Callable[[], None]) -> None:
    t0 = time.perf_counter()
    for i in range(steps):
        loss = v.step()
        if i == 0:
            v.first_loss = loss.item()
    sync()
    v.warmup_s = time.perf_counter() - t0


def time_windows(variants: list[Variant], windows: int, per_window: int, sync, threads: int | None) -> None:
    """Round robin over the variants, a window each per round, so that slow spells hit all of them alike.

    On CPU (threads given) it also notes the CPU time the process got in each window as a share of threads x
    wall time: well under 1 means that other processes had the cores, and the window's figures are low.
    """
    for _ in range(windows):
        for v in variants:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(per_window):
                v.step()
            sync()
            wall = time.perf_counter() - t0
            v.window_s.append(wall / per_window)
            if threads:
                v.cpu_share.append((time.process_time() - c0) / (wall * threads))


def profile_step(v: Variant, device: torch.device, rows: int = 15) -> None:
    """Top ops of one step by self time: where a variant spends its step, to compare op by op."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        v.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of one step: {v.name}")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def adamw_kernels(cfg: ModelConfig, spec, device: torch.device, sync) -> dict[str, float]:
    """Seconds per AdamW step over our parameters, per kernel: the optimizer's share of a training step."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return {k: best_seconds(make_optimizer(model, spec, k).step, 5, sync) for k in ("foreach", "fused")}


# ---------------------------------------------------------------- report


def summarize(done: list[Variant], tokens: int, fpt: float, peak: float | None) -> list[dict]:
    rows = []
    for v in done:
        step_s = statistics.median(v.window_s)
        rows.append(
            {
                "variant": v.name,
                "tokens_per_s": tokens / step_s,
                "best_tokens_per_s": tokens / min(v.window_s),
                "step_ms": step_s * 1e3,
                "spread": (max(v.window_s) - min(v.window_s)) / step_s,
                "cpu_share": statistics.median(v.cpu_share) if v.cpu_share else None,
                "tflops": tokens / step_s * fpt / 1e12,
                "fraction_of_peak": tokens / step_s * fpt / peak if peak else None,
                "best_fraction_of_peak": tokens / min(v.window_s) * fpt / peak if peak else None,
                "warmup_s": v.warmup_s,
                "first_loss": v.first_loss,
                "window_s": v.window_s,
            }
        )
    return rows


def headline(rows: list[dict], frac_label: str, cpu: bool) -> dict:
    """The figures the goals are about: the same-function check, best-vs-best ratio, fraction of peak."""
    losses = [r["first_loss"] for r in rows]
    out: dict = {"first_loss_gap": max(losses) - min(losses)}
    print(f"same function: first losses agree within {out['first_loss_gap']:.1e}")

    def best(side: str, key: str = "tokens_per_s") -> dict | None:
        return max((r for r in rows if r["variant"].startswith(side)), key=lambda r: r[key], default=None)

    ours, hf = best("ours"), best("hf")
    out["best"] = {"ours": ours and ours["variant"], "hf": hf and hf["variant"]}
    if ours and hf:
        key = "best_tokens_per_s"
        out["ratio_ours_over_hf"] = ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
        out["ratio_from_best_windows"] = best_ratio = best("ours", key)[key] / best("hf", key)[key]
        print(
            f"ours_best / hf_best tokens/s: {ratio:.3f} ({ours['variant']} / {hf['variant']}; goal >= "
            f"{GOAL_RATIO}); from best windows {best_ratio:.3f}"
        )
    for side, r in (("ours", ours), ("hf", hf)):
        if r and r["fraction_of_peak"] is not None:
            goal = f"; goal >= {GOAL_CPU_FRACTION}" if side == "ours" and cpu else ""
            print(
                f"{side}_best {frac_label}: {r['fraction_of_peak']:.3f} ({r['variant']}{goal})"
                f"; from its best window {r['best_fraction_of_peak']:.3f}"
            )
    shares = [r["cpu_share"] for r in rows if r["cpu_share"] is not None]
    if shares and min(shares) < 0.85:
        print(
            f"note: in some windows this process got only {min(shares):.0%} of the CPU time its threads could"
            " use: other processes were busy, so medians are low; best windows are nearer an idle machine"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    torch.set_num_threads(args.threads)
    if not cpu:
        torch.set_float32_matmul_precision("high")
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    try:
        spec = resolve(args.config, args.override)
        cfg = ModelConfig.model_validate(
            {**spec.model.model_dump(), "seq_len": args.seq_len or spec.model.seq_len}
        )
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    B, T = args.batch or spec.train.micro_batch_size, cfg.seq_len
    fpt = flops_per_token(cfg)
    dev_name = "cpu" if cpu else torch.cuda.get_device_name()
    print(
        f"{args.config} {' '.join(args.override)}\n{human(param_count(cfg))} params "
        f"({human(matmul_params(cfg))} in matmuls), d_model {cfg.d_model}, {cfg.n_layers} layers, "
        f"{cfg.n_heads}/{cfg.n_kv_heads} heads, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, "
        f"tied {cfg.tie_embeddings}; batch {B} x {T} = {B * T} tokens; {fpt / 1e6:.1f} MFLOP/token"
    )
    print(
        f"device {dev_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}, AdamW {args.adamw}"
    )
    results: dict = {"args": vars(args), "model": cfg.model_dump(), "batch": B, "flops_per_token": fpt}
    if cpu:
        results |= cpu_peak_report(cfg, B * T)
    else:
        results["peak_flops"] = peak_flops(dev_name)
        if results["peak_flops"] is None:
            print(f"note: no peak known for {dev_name!r} (model/hardware.py); MFU is left out")
    results["adamw_step_s"] = adamw = adamw_kernels(cfg, spec, device, sync)
    print("AdamW step over our parameters: " + ", ".join(f"{k} {s * 1e3:.1f} ms" for k, s in adamw.items()))

    batch = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(args.seed))
    batch = batch.to(device)
    per_window = max(1, args.steps // args.windows)
    # CPU: all variants at once, interleaved with a torch.mm probe; CUDA: one at a time (GPU memory)
    groups = [args.variants] if cpu else [[n] for n in args.variants]
    done: list[Variant] = []
    for names in groups:
        variants = [build_variant(n, cfg, spec, batch, args) for n in names]
        for v in variants:
            warm_up(v, args.warmup, sync)
            print(f"  warmed up {v.name}: {v.warmup_s:.1f} s", flush=True)
        if cpu:
            a, b = torch.randn(PROBE_N, PROBE_N), torch.randn(PROBE_N, PROBE_N)
            probe = Variant("torch.mm probe", lambda a=a, b=b: torch.mm(a, b))
            time_windows([*variants, probe], args.windows, per_window, sync, args.threads)
            results["matmul_peak"][f"{PROBE_N} interleaved"] = 2 * PROBE_N**3 / min(probe.window_s)
        else:
            time_windows(variants, args.windows, per_window, sync, None)
        if args.profile:
            for v in variants:
                profile_step(v, device)
        done += variants
        del variants
        if not cpu:
            torch.cuda.empty_cache()
    if cpu:
        results["torch_mm_peak"] = max(results["matmul_peak"].values())
        results["peak_flops"] = max(results["torch_mm_peak"], *results["onednn_peak"].values())
    peak = results["peak_flops"]

    rows = summarize(done, B * T, fpt, peak)
    frac_label = "of peak" if cpu else "MFU"
    peak_label = "best fp32 matmul of this run (MKL or oneDNN)" if cpu else "bf16 data-sheet peak"
    print(
        f"\n{B * T} tokens a step; median of {args.windows} windows of {per_window} steps; spread = (slowest"
        f" - fastest window) / median; cpu share = CPU time / (threads x wall); peak = {peak_label}"
        + (f" {peak / 1e12:.3f} TFLOP/s" if peak else "")
    )
    print_table(
        rows,
        [
            ("variant", "variant", ""),
            ("tokens/s", "tokens_per_s", ",.0f"),
            ("best tok/s", "best_tokens_per_s", ",.0f"),
            ("step ms", "step_ms", ".1f"),
            ("spread", "spread", ".0%"),
            ("cpu share", "cpu_share", ".2f"),
            ("TFLOP/s", "tflops", ".4f"),
            (frac_label, "fraction_of_peak", ".3f"),
            ("warmup s", "warmup_s", ".1f"),
            ("first loss", "first_loss", ".5f"),
        ],
    )
    results |= {"variants": rows, **headline(rows, frac_label, cpu)}
    if cpu and results["peak_flops"] > results["torch_mm_peak"]:
        mm_peak = results["torch_mm_peak"]
        results["fraction_of_torch_mm_peak"] = {r["variant"]: r["tflops"] * 1e12 / mm_peak for r in rows}
        print(
            f"against torch.mm's peak alone ({mm_peak / 1e9:.0f} GFLOP/s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in results["fraction_of_torch_mm_peak"].items())
        )
    print(f"wrote {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
