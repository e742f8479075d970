"""lmctl command line. Every verb is a thin layer over a Python function; heavy imports happen inside verbs,
so `lmctl --help` stays instant."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """examples:
  lmctl presets                                   list model presets and their sizes
  lmctl train --preset tiny --run-dir runs/dev    train in this process (no Ray), resuming if the run exists
  lmctl train --preset tiny --run-dir runs/dev --override train.steps=50 --override train.lr=1e-3
  lmctl stage --dataset configs/data/shakespeare.jsonl --vocab-size 2048      tokenize once into runs/store
  lmctl stage --dataset HuggingFaceFW/fineweb-edu --subset sample-10BT --max-tokens 1e9 --store s3://bucket/lmctl
"""

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STORE = f"file://{REPO / 'runs' / 'store'}"
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


def _count(text: str) -> int:
    """'1e9', '500M', '2_000_000' -> int: token counts are easier to type in these forms."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}
    t = text.strip().lower().replace("_", "")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t)) if ("e" in t or "." in t) else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 1000000, 1e9, 500M)") from None


def cmd_stage(args: argparse.Namespace) -> int:
    import datasets
    from pydantic import ValidationError

    from model.config import ConfigError, DataConfig
    from model.store import StoreError
    from orchestrator.stage import StageError, stage

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
    try:
        result = stage(
            spec,
            args.store,
            vocab_size=args.vocab_size,
            endpoint_url=args.endpoint_url,
            sample_chars=int(args.tokenizer_sample_mb * 1e6),
            progress=not args.json and sys.stderr.isatty(),
        )
    except (StageError, StoreError) as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    _print_stage_summary(result)
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

    p = sub.add_parser(
        "stage",
        help="tokenize a dataset once into <store>/datasets/<hash>/ (resumable, a no-op when staged)",
        description="Tokenize a hub dataset or local files (jsonl, json, txt, parquet; a file or a folder), "
        "pack them into shards and upload them with a manifest to <store>/datasets/<hash>/. Staging the "
        "same thing again is a no-op; an interrupted staging resumes where it stopped.",
    )
    p.add_argument("--dataset", required=True, help="hub id (org/name) or a local file or folder")
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
    p.add_argument("--vocab-size", type=int, help="vocabulary of a trained tokenizer (default: 32768)")
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
        default=os.environ.get("LMCTL_STORE", DEFAULT_STORE),
        help="s3://bucket/prefix, file:///dir or a directory (default: $LMCTL_STORE, else <repo>/runs/store)",
    )
    p.add_argument(
        "--endpoint-url", help="S3 endpoint: R2, MinIO, B2, RunPod (default: $AWS_ENDPOINT_URL or AWS)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON (no progress bar, no table)")
    p.set_defaults(func=cmd_stage)
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
