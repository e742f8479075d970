"""Staging throughput: `lmctl stage` end to end vs tokenizers' batch encoding vs a per-document datasets.map.

    python -m bench.stage_throughput                  # ~45 MB of text, ~2 minutes on 2 idle cores
    python -m bench.stage_throughput --mb 15 --reps 1

All three tokenize the same deterministic text (shipped corpus lines shuffled into documents by a seeded
RNG, written as jsonl under /tmp) with the same tokenizer:

- ceiling: `Tokenizer.encode_batch` (tokenizers' Rust-parallel batch encoding, ids read out) over the text
  already in memory, in 4 MB batches: no reading, packing or writing. `encode_only` is the same without
  reading the ids out of the Encodings (not usable for anything; shown as the bound the Python API sets).
- stage: `orchestrator.stage.stage` from the jsonl file into a fresh file:// store: streaming read, encode,
  pack, shard files, checksums, verified uploads, manifest.
- naive: what from-scratch trainers do: `load_dataset` (non-streaming), `map` tokenizing one document per
  call, then concatenating the ids with end-of-text.

Then the peak RSS of staging at two dataset sizes, each in a fresh process, to show memory stays flat.
Printed side by side; written to bench/results/stage_throughput.json. Never passes or fails on time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import RESULTS_DIR, print_table, write_json
from model.config import DEFAULT_CORPUS
from model.shards import read_jsonl_texts
from model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
SHARD_TOKENS = 1 << 20  # ~11 shards for 45 MB, so uploads overlap tokenizing as they would at scale


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    """Documents of 10-150 consecutive corpus lines from random places, until `megabytes` of jsonl."""
    lines = [ln for doc in read_jsonl_texts(DEFAULT_CORPUS) for ln in doc.split("\n")]
    rng, size, n = random.Random(seed), 0, 0
    with open(path, "w") as f:
        while size < megabytes * 1e6:
            k = rng.randint(10, 150)
            start = rng.randrange(len(lines) - k)
            row = json.dumps({"id": n, "text": "\n".join(lines[start : start + k])}) + "\n"
            f.write(row)
            size, n = size + len(row), n + 1
    return path


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn) -> dict:
    """Run fn() -> tokens (or a dict with them); wall time, and cores used = CPU seconds / wall seconds."""
    t, c = time.perf_counter(), cpu_seconds()
    out = fn()
    wall = time.perf_counter() - t
    row = out if isinstance(out, dict) else {"tokens": out}
    return {**row, "seconds": wall, "cores_used": (cpu_seconds() - c) / wall}


def ceiling(tok: Tokenizer, texts: list[str], batch_chars: int = 4 << 20, ids: bool = True) -> int:
    n, batch, chars = 0, [], 0
    for text in itertools.chain(texts, [None]):
        if text is not None:
            batch.append(text)
            chars += len(text)
        if batch and (text is None or chars >= batch_chars):
            if ids:
                n += sum(len(x) for x in tok.encode_batch(batch)) + len(batch)  # + one end-of-text each
            else:
                tok.backend.encode_batch_fast(batch, add_special_tokens=False)
            batch, chars = [], 0
    return n


def staging(data: Path, tok_path: Path, work: Path) -> dict:
    """End to end; also the seconds of the tokenizing phase (what scales with the dataset)."""
    from model.config import DataConfig
    from orchestrator.stage import stage

    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    spec = DataConfig(dataset=str(data), tokenizer=str(tok_path), shard_tokens=SHARD_TOKENS)
    result = stage(spec, str(store), work_dir=work / "stage-work")
    return {"tokens": result.tokens, "tokenize_seconds": result.tokenize_seconds}


def naive(data: Path, tok: Tokenizer, work: Path) -> int:
    import datasets

    datasets.disable_progress_bars()
    cache = work / "hf-cache"
    shutil.rmtree(cache, ignore_errors=True)
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    backend, eot = tok.backend, tok.eot_id
    ds = ds.map(
        lambda ex: {"ids": backend.encode(ex["text"], add_special_tokens=False).ids},
        remove_columns=ds.column_names,
        load_from_cache_file=False,
    )
    out = np.fromiter(itertools.chain.from_iterable(ids + [eot] for ids in ds["ids"]), np.uint32)
    return int(out.size)


MEMORY_CHILD = """
import json, re, sys
from pathlib import Path
from model.config import DataConfig
from orchestrator.stage import stage
# VmHWM (peak RSS of this process image); ru_maxrss would carry the parent's peak over fork+exec
rss = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
base = rss()
spec = DataConfig(dataset=sys.argv[1], tokenizer=sys.argv[2], shard_tokens=int(sys.argv[4]))
r = stage(spec, sys.argv[3], work_dir=sys.argv[3] + "-work")
print(json.dumps({"tokens": r.tokens, "peak_rss_mb": rss(), "rss_after_imports_mb": base}))
"""


def peak_memory(data: Path, tok_path: Path, work: Path) -> dict:
    """Staging in a fresh process; its peak RSS (imports included, and shown apart). Linux only."""
    store = work / f"mem-store-{data.stem}"
    shutil.rmtree(store, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(data), str(tok_path), str(store), str(SHARD_TOKENS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.stage_throughput", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--mb", type=float, default=45, help="jsonl size for the throughput runs (default 45)")
    ap.add_argument("--small-mb", type=float, default=15, help="the smaller size for the memory check")
    ap.add_argument("--vocab", type=int, default=32768, help="tokenizer vocabulary (trained on the corpus)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of ceiling and stage")
    ap.add_argument("--no-naive", action="store_true", help="skip the slow datasets.map pipeline")
    ap.add_argument("--out", default=str(RESULTS_DIR / "stage_throughput.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    work = Path(tempfile.mkdtemp(prefix="lmctl-bench-stage-"))
    try:
        load_before = os.getloadavg()[0]
        big = make_corpus(work / f"text_{args.mb:g}mb.jsonl", args.mb)
        small = make_corpus(work / f"text_{args.small_mb:g}mb.jsonl", args.small_mb, seed=1)
        tok = Tokenizer.train(read_jsonl_texts(DEFAULT_CORPUS), args.vocab)
        tok_path = work / "tokenizer.json"
        tok.save(tok_path)
        texts = list(read_jsonl_texts(big))
        print(
            f"{big.stat().st_size / 1e6:.1f} MB jsonl, {len(texts)} documents, vocab {tok.vocab_size}, "
            f"{os.cpu_count()} cores, load {load_before:.2f}",
            flush=True,
        )

        runs: dict[str, list[dict]] = {"ceiling": [], "encode_only": [], "stage": []}
        for rep in range(args.reps):  # interleaved, so a busy spell on the machine hits all alike
            runs["ceiling"].append(timed(lambda: ceiling(tok, texts)))
            runs["stage"].append(timed(lambda: staging(big, tok_path, work)))
            runs["encode_only"].append(timed(lambda: ceiling(tok, texts, ids=False)))
            runs["encode_only"][-1]["tokens"] = runs["ceiling"][0]["tokens"]
            print(f"rep {rep + 1}/{args.reps} done", flush=True)
        if not args.no_naive:
            runs["naive"] = [timed(lambda: naive(big, tok, work))]
            print("naive done", flush=True)

        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
        steady = min(runs["stage"], key=lambda r: r["tokenize_seconds"])
        best["stage_tokenizing_phase"] = {
            "tokens": steady["tokens"],
            "seconds": steady["tokenize_seconds"],
            "cores_used": None,
        }
        ceil_rate = best["ceiling"]["tokens"] / best["ceiling"]["seconds"]
        rows = []
        for name in ("encode_only", "ceiling", "stage", "stage_tokenizing_phase", "naive"):
            if name not in best:
                continue
            r = best[name]
            rate = r["tokens"] / r["seconds"]
            rows.append({"variant": name, **r, "tok_per_s": rate / 1e6, "vs_ceiling": rate / ceil_rate})
        print()
        print_table(
            rows,
            [
                ("variant (best of reps)", "variant", ""),
                ("tokens", "tokens", ",d"),
                ("seconds", "seconds", ".2f"),
                ("Mtok/s", "tok_per_s", ".3f"),
                ("x ceiling", "vs_ceiling", ".2f"),
                ("cores used", "cores_used", ".2f"),
            ],
        )

        memory = []
        for path in (small, big):
            m = peak_memory(path, tok_path, work)
            memory.append({"text_mb": path.stat().st_size / 1e6, **m})
        memory[-1]["growth_vs_small"] = memory[-1]["peak_rss_mb"] / memory[0]["peak_rss_mb"]
        print()
        print_table(
            memory,
            [
                ("staged text MB", "text_mb", ".1f"),
                ("tokens", "tokens", ",d"),
                ("peak RSS MB", "peak_rss_mb", ".0f"),
                ("RSS after imports MB", "rss_after_imports_mb", ".0f"),
            ],
        )
        load_after = os.getloadavg()[0]
        ratio = best["stage"]["tokens"] / best["stage"]["seconds"] / ceil_rate
        naive_ratio = (
            ceil_rate / (best["naive"]["tokens"] / best["naive"]["seconds"]) if "naive" in best else None
        )
        enc_rate = best["encode_only"]["tokens"] / best["encode_only"]["seconds"]
        print(
            f"\nstage / ceiling = {ratio:.2f} (goal >= 0.8), stage / encode_only = "
            f"{ratio * ceil_rate / enc_rate:.2f}"
            + (f"; ceiling / naive = {naive_ratio:.2f}" if naive_ratio else "")
            + f"; peak RSS {memory[0]['peak_rss_mb']:.0f} MB at {memory[0]['text_mb']:.0f} MB of text, "
            f"{memory[-1]['peak_rss_mb']:.0f} MB at {memory[-1]['text_mb']:.0f} MB"
        )
        if max(load_before, load_after) > 0.5 * (os.cpu_count() or 1):
            print(
                f"note: load average {load_before:.2f} -> {load_after:.2f}: other processes shared the "
                f"cores, so wall-clock figures are low and noisy (cores used < {os.cpu_count()} shows it)"
            )
        path = write_json(
            args.out,
            {
                "benchmark": "stage_throughput",
                "text_mb": big.stat().st_size / 1e6,
                "documents": len(texts),
                "vocab_size": tok.vocab_size,
                "shard_tokens": SHARD_TOKENS,
                "runs": runs,
                "best": rows,
                "stage_vs_ceiling": ratio,
                "stage_vs_encode_only": ratio * ceil_rate / enc_rate,
                "ceiling_vs_naive": naive_ratio,
                "memory": memory,
                "loadavg_before_after": [load_before, load_after],
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
