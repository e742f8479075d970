"""lmctl command line. Every verb is a thin layer over a Python function; heavy imports happen inside verbs,
so `lmctl --help` stays instant."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  lmctl presets                                   list model presets and their sizes
  lmctl train --preset tiny --run-dir runs/dev    train in this process (no Ray), resuming if the run exists
  lmctl train --preset tiny --run-dir runs/dev --override train.steps=50 --override train.lr=1e-3
"""


def cmd_presets(args: argparse.Namespace) -> int:
    from model.config import flops_per_token, human, param_count, preset_names, resolve

    rows = []
    for name in preset_names():
        spec = resolve(name)
        m, t = spec.model, spec.train
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
    for r in sorted(rows, key=lambda r: r["params"]):
        table.add_row(
            r["preset"],
            human(r["params"]),
            str(r["layers"]),
            str(r["d_model"]),
            r["heads"],
            str(r["seq_len"]),
            human(r["flops_per_token"]),
            human(r["global_batch_tokens"]),
        )
    Console().print(table)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from model.train import main as train_main

    argv = ["--run-dir", args.run_dir]
    argv += ["--config", args.config] if args.config else ["--preset", args.preset]
    for o in args.override:
        argv += ["--override", o]
    if args.device:
        argv += ["--device", args.device]
    if args.stop_at is not None:
        argv += ["--stop-at", str(args.stop_at)]
    return train_main(argv)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lmctl",
        description="Pretrain Llama-style language models: presets, staging, training, checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("presets", help="list model presets with parameter counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser(
        "train",
        help="run the training loop in this process (no Ray): debugging, benchmarks",
        description="Run the training loop in this process. Resumes from the run's newest checkpoint.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="preset name (tiny, 124m, 350m, 1b) or a YAML path")
    src.add_argument("--config", help="a run's resolved config.yaml")
    p.add_argument("--run-dir", required=True, help="where checkpoints/ and metrics.jsonl go")
    p.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.steps=100"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--stop-at", type=int, help="stop with a checkpoint after this many steps")
    p.set_defaults(func=cmd_train)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from model.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
