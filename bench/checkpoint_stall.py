"""The checkpoint stall as a run sees it: train() itself, saving to a file:// and a loopback s3:// store.

bench/checkpoint_io.py times a bare save(); a run does more: it snapshots the state (the only part it waits
for), then trains on while a background thread writes and commits it, and waits only if the next save comes
before the previous one has committed. This runs the same short training three times (no saves; saves to a
file:// store; saves to an S3 server on loopback, moto's) and reports, per save, what the steps around it cost
beyond the median step, the time until the commit, and how many steps trained while it uploaded.

    python -m bench.checkpoint_stall            # ~1.1 GB checkpoints, 24 steps each: ~3 minutes on 2 cores

On a 2-core CPU the upload thread competes with training for the cores, so the excess here overstates what a
GPU run pays (its steps run on the GPU while the host writes). The GPU figure is bench.gpu_check's `stall`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._common import RESULTS_DIR, print_table, write_json

TESTS = Path(__file__).resolve().parent.parent / "tests"
# A shape whose state is large (embeddings) but whose step is cheap on a CPU: the stall, not compute, shows.
SHAPE = [
    "model.vocab_size=32768",
    "model.d_model=1024",
    "model.n_layers=2",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.d_ff=2816",
    "model.seq_len=128",
    "model.tie_embeddings=false",
    "train.micro_batch_size=1",
    "train.global_batch_tokens=128",
    "train.log_every=1",
    "train.eval_every=100000",
    "train.keep_checkpoints=2",
]


def run(spec, run_dir: Path, root: str | None) -> dict:
    """Train `spec`; the time of every step from on_log, and the checkpoint records from metrics.jsonl."""
    from model.metrics import read_metrics
    from model.train import train

    stamps: list[float] = []
    t0 = time.perf_counter()
    train(
        spec,
        run_dir,
        device="cpu",
        on_log=lambda r: "loss" in r and stamps.append(time.perf_counter()),
        checkpoints=root,
    )
    total = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    recs = read_metrics(run_dir / "metrics.jsonl")
    commits = [r for r in recs if "checkpoint" in r]
    logged = {r["step"]: r["time"] for r in recs if "loss" in r}
    for c in commits:  # steps logged between the save (its step) and the commit: training went on
        c["steps_during_upload"] = sum(1 for s, t in logged.items() if s > c["step"] and t < c["time"])
    return {"train_s": total, "gaps": gaps, "median_step_s": statistics.median(gaps), "commits": commits}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=6, help="checkpoint interval in steps")
    ap.add_argument("--json", default=str(RESULTS_DIR / "checkpoint_stall.json"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(TESTS))
    from chaos_storage import aws_env
    from s3 import make_bucket, start_moto

    from model.config import param_count, resolve
    from model.train import prepare_local_data

    os.environ.setdefault("LMCTL_CACHE", tempfile.mkdtemp(prefix="lmctl-stall-cache-"))
    base = [*SHAPE, f"train.steps={args.steps}", "train.warmup_steps=1"]
    rows, results = [], {}
    server, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp, aws_env(endpoint):
            tmp = Path(tmp)
            spec = prepare_local_data(resolve("tiny", base), tmp / "data-run")
            state_bytes = 12 * param_count(spec.model)
            print(f"{param_count(spec.model) / 1e6:.0f}M parameters: {state_bytes / 1e9:.2f} GB a checkpoint")
            bucket = make_bucket(endpoint)
            cases = [
                ("no saves", 100000, None),
                ("file://", args.every, f"file://{tmp / 'store'}"),
                ("s3:// loopback", args.every, f"{bucket.uri}/ckpt"),
            ]
            for name, every, root in cases:
                r = run(
                    spec.with_train(checkpoint_every=every),
                    tmp / name.replace("/", "").replace(" ", "-"),
                    root,
                )
                results[name] = r
                saves = [c for c in r["commits"] if c["step"] < args.steps]  # the last one ends the run
                excess = [
                    g - r["median_step_s"]
                    for i, g in enumerate(r["gaps"], start=2)
                    if any(c["step"] in (i - 1, i) for c in saves)
                ]
                rows.append(
                    {
                        "case": name,
                        "step": r["median_step_s"],
                        "saves": len(saves),
                        "excess": max(excess, default=0.0),
                        "commit": max((c["checkpoint_s"] for c in saves), default=None),
                        "during": min((c["steps_during_upload"] for c in saves), default=None),
                    }
                )
    finally:
        server.stop()
    print_table(
        rows,
        [
            ("store", "case", ""),
            ("median step s", "step", ".3f"),
            ("saves", "saves", "d"),
            ("max excess s", "excess", ".3f"),
            ("commit s", "commit", ".2f"),
            ("steps during upload", "during", ""),
        ],
    )
    print(
        "excess: the steps around a save beyond the median step (the snapshot, and the cores the writer "
        "takes on a CPU); steps during upload > 0: training did not wait for the store"
    )
    path = write_json(args.json, {"state_bytes": state_bytes, "rows": rows, "runs": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
