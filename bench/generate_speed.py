"""Generation speed: model.generate's KV-cached greedy decoding vs re-running the whole sequence per token.

    python -m bench.generate_speed                      # CPU: tiny and 124m, fp32; ~1 minute on 2 cores
    python -m bench.generate_speed --device cuda        # 124m and 1b, bf16 weights, 256 new tokens
    python -m bench.generate_speed --models tiny --new-tokens 32 --reps 5

Batch 1, greedy (temperature 0), a seeded random prompt into a seeded random-init Decoder of each preset's
shape, two ways:

- cached: `model.generate.generate()` as it is: one prefill of the prompt into the KV cache, then one token
  per step.
- uncached: every step runs the full forward over the whole sequence so far and takes the last position's
  argmax, which is what a decoder without a cache has to do.

In fp32 both must produce the same tokens (asserted). On CUDA that check runs in fp32 first, then the timing
in bf16 weights, whose rounding differs between the two paths, so there their agreement is only recorded. One
warm-up, then `--reps` interleaved repetitions, best of each. Printed side by side; written to
bench/results/generate_speed.json. Never passes or fails on time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from bench._common import RESULTS_DIR, print_table, write_json
from model.config import ModelConfig, resolve
from model.decoder import Decoder
from model.generate import generate

# models and new tokens for each, per device; the CPU's keep the whole run well under 3 minutes on 2 cores
DEFAULTS = {"cpu": {"tiny": 128, "124m": 64}, "cuda": {"124m": 256, "1b": 256}}


@torch.inference_mode()
def greedy_uncached(model: Decoder, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """generate(temperature=0) without the KV cache: the whole sequence through the model for every token."""
    ids = prompt
    for _ in range(new_tokens):
        ids = torch.cat((ids, model(ids)[:, -1].argmax(-1)[:, None]), dim=1)
    return ids


def _timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _agreeing(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens two [1, T] sequences share."""
    diff = (a != b).nonzero()
    return int(diff[0, 1]) if len(diff) else a.shape[1]


def measure(
    cfg: ModelConfig,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_len: int = 16,
    new_tokens: int = 128,
    reps: int = 3,
    seed: int = 0,
) -> dict:
    """Time both ways of greedy decoding on one model; figures per variant and cached / uncached.

    bench.gpu_check's `generate` stage calls this too.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = Decoder(cfg).eval()  # initialised on the device: a 1b init on the host takes long
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(device)
    variants: dict[str, Callable[[int], torch.Tensor]] = {
        "cached": lambda n: generate(model, prompt, n, temperature=0.0),
        "uncached": lambda n: greedy_uncached(model, prompt, n),
    }
    # fp32: the two must agree token for token (in the timed dtype when that is fp32, the warm-up runs)
    outs = {k: f(new_tokens) for k, f in variants.items()}
    same = _agreeing(outs["cached"], outs["uncached"]) - prompt_len
    assert same == new_tokens, f"uncached greedy left the cached tokens after {same} of {new_tokens} (fp32)"
    result: dict = {
        "params": model.num_params(),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "reps": reps,
        "same_tokens_fp32": True,
    }
    if dtype != torch.float32:
        model.to(dtype)
        outs = {k: f(new_tokens) for k, f in variants.items()}  # the warm-up in the timed dtype
        result["agreeing_tokens"] = _agreeing(outs["cached"], outs["uncached"]) - prompt_len

    times: dict[str, dict[str, list[float]]] = {k: {"total_s": [], "ttft_s": []} for k in variants}
    for _ in range(reps):  # interleaved, so that a busy spell on the machine hits both alike
        for k, f in variants.items():
            seconds, out = _timed(lambda f=f: f(new_tokens), device)
            assert out.shape[1] == prompt_len + new_tokens
            times[k]["total_s"].append(seconds)
    # first tokens apart from the long runs: right after one, a short call on CPU is slower (up to 2x on tiny)
    for _ in range(max(reps, 5)):
        for k, f in variants.items():
            times[k]["ttft_s"].append(_timed(lambda f=f: f(1), device)[0])
    for k, t in times.items():
        total, ttft = min(t["total_s"]), min(t["ttft_s"])
        result[k] = {
            "tokens_per_s": new_tokens / total,
            "ms_per_token": total / new_tokens * 1e3,
            # the steady state: the steps after the first token
            "decode_ms_per_token": (total - ttft) / max(new_tokens - 1, 1) * 1e3,
            "ttft_ms": ttft * 1e3,
            **t,
        }
    result["cached_vs_uncached"] = result["cached"]["tokens_per_s"] / result["uncached"]["tokens_per_s"]
    result["decode_cached_vs_uncached"] = (
        result["uncached"]["decode_ms_per_token"] / result["cached"]["decode_ms_per_token"]
    )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.generate_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device",
        help="comma list of cpu, cuda (default: cpu, and cuda too when torch sees a GPU)",
    )
    ap.add_argument("--models", help="comma list of presets (default: tiny,124m on cpu; 124m,1b on cuda)")
    ap.add_argument(
        "--new-tokens", type=int, help="new tokens per run (default: 128 tiny, 64 124m on cpu; 256 cuda)"
    )
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up; best is shown")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR / "generate_speed.json"))
    args = ap.parse_args(argv)
    devices = args.device.split(",") if args.device else ["cpu"] + ["cuda"] * torch.cuda.is_available()
    if any(d not in DEFAULTS for d in devices):
        ap.error(f"--device: choose from {', '.join(DEFAULTS)}")
    if "cuda" in devices and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")

    if args.threads:
        torch.set_num_threads(args.threads)

    runs, rows = [], []
    for device in devices:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        models = args.models.split(",") if args.models else list(DEFAULTS[device])
        for name in models:
            n = args.new_tokens or DEFAULTS[device].get(name, 64)
            print(f"{device} {name}: {args.prompt_len}-token prompt, {n} new tokens", flush=True)
            r = measure(resolve(name).model, device, dtype, args.prompt_len, n, args.reps, args.seed)
            runs.append({"model": name, **r})
            for variant in ("cached", "uncached"):
                ratio = r["cached_vs_uncached"] if variant == "cached" else 1.0
                rows.append(
                    {"run": f"{device} {name} {r['dtype']}", "variant": variant, **r[variant], "x": ratio}
                )
            if device == "cuda":
                torch.cuda.empty_cache()
    print()
    print_table(
        rows,
        [
            ("device model dtype", "run", ""),
            ("variant", "variant", ""),
            ("tok/s", "tokens_per_s", ",.1f"),
            ("ms/token", "ms_per_token", ".2f"),
            ("decode ms/token", "decode_ms_per_token", ".2f"),
            ("first token ms", "ttft_ms", ".2f"),
            ("x uncached", "x", ".2f"),
        ],
    )
    path = write_json(args.out, {"benchmark": "generate_speed", "runs": runs})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
