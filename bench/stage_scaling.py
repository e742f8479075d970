"""Staging spread over workers, and what a cloud launch of a hub dataset uploads from the launching machine.

    python -m bench.stage_scaling                  # ~24 MB of parquet text, ~2 minutes on 2 idle cores
    python -m bench.stage_scaling --mb 8 --reps 1

1. Throughput: the same parquet dataset of FILES input files (a hub dataset's layout; one unit of work per
   file) staged with its units run (a) in this process, one after another, tokenizers using every core,
   (b) as Ray tasks on a local Ray cluster of 1 CPU, (c) of 2 CPUs: two units at once, each tokenizing on
   one thread. Interleaved repetitions, best of each; Ray's start is not timed. Every variant must commit
   the same bytes (checked: the manifests are equal).
2. Launcher bytes: `launch()` of a cloud run (SkyPilot's launch replaced, as in the tests) on a hub dataset
   served by a loopback hub (tests/hubsim.py) into a loopback S3 (moto): the bytes this process reads from
   the hub and writes to the bucket, beside what staging that dataset here would upload.

Written to bench/results/stage_scaling.json. Never passes or fails on time.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench._common import RESULTS_DIR, print_table, write_json
from model.config import DEFAULT_CORPUS, DataConfig
from model.shards import read_jsonl_texts

TESTS = Path(__file__).resolve().parent.parent / "tests"
FILES = 8


def make_parquet(folder: Path, megabytes: float, files: int = FILES, seed: int = 0) -> Path:
    """`files` parquet files of documents of 10-150 consecutive corpus lines, `megabytes` of text in all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [ln for doc in read_jsonl_texts(DEFAULT_CORPUS) for ln in doc.split("\n")]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        texts, size = [], 0
        while size < megabytes * 1e6 / files:
            n = rng.randint(10, 150)
            start = rng.randrange(len(lines) - n)
            texts.append("\n".join(lines[start : start + n]))
            size += len(texts[-1])
        pq.write_table(pa.table({"text": texts}), folder / f"train-{k:05d}-of-{files:05d}.parquet")
    return folder


def throughput(data: Path, tok_path: Path, work: Path, reps: int) -> list[dict]:
    """Best of `reps` for each way of running the units; asserts they commit the same manifest."""
    import ray

    from orchestrator.driver import start_ray
    from orchestrator.stage import stage
    from orchestrator.stage_unit import RayUnits

    spec = DataConfig(dataset=str(data), tokenizer=str(tok_path), shard_tokens=1 << 20)
    runs: dict[str, list[dict]] = {"in_process": [], "ray_1_worker": [], "ray_2_workers": []}
    manifests = set()
    for rep in range(reps):
        for name, workers in (("in_process", 0), ("ray_1_worker", 1), ("ray_2_workers", 2)):
            store = work / f"store-{name}"
            shutil.rmtree(store, ignore_errors=True)
            if workers:
                start_ray(workers, None)
            try:
                t = time.perf_counter()
                r = stage(spec, str(store), unit_bytes=1, runner=RayUnits() if workers else None)
                seconds = time.perf_counter() - t
            finally:
                if workers:
                    ray.shutdown()
            manifests.add(r.manifest.to_json())
            runs[name].append({"tokens": r.tokens, "seconds": seconds, "units": r.units})
            print(f"rep {rep + 1}/{reps} {name}: {r.tokens / seconds / 1e6:.2f} Mtok/s", flush=True)
    assert len(manifests) == 1, "the ways of running the units committed different datasets"
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    one = best["ray_1_worker"]["tokens"] / best["ray_1_worker"]["seconds"]
    return [
        {
            "variant": k,
            **r,
            "mtok_per_s": r["tokens"] / r["seconds"] / 1e6,
            "vs_ray_1": r["tokens"] / r["seconds"] / one,
        }
        for k, r in best.items()
    ]


def launcher_bytes(data: Path, work: Path) -> dict:
    """A cloud launch of the dataset as a hub id: bytes read from the hub and written to the bucket here."""
    sys.path.insert(0, str(TESTS))
    import sky
    from hubsim import FakeHub, use_endpoint
    from s3 import FAKE_KEY, FAKE_SECRET, REGION, make_bucket, start_moto

    from model.store import S3Store
    from orchestrator.launch import Hardware, launch
    from orchestrator.stage import stage

    repo = work / "hub" / "bench" / "corpus" / "data"
    shutil.copytree(data, repo)
    server, endpoint = start_moto()
    written: dict[str, int] = {}
    real_file, real_bytes = S3Store.put_file, S3Store.put_bytes

    def put_file(self, local, key, **kw):
        written[key] = Path(local).stat().st_size
        return real_file(self, local, key, **kw)

    def put_bytes(self, key, data):
        written[key] = len(data)
        return real_bytes(self, key, data)

    env = {"AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": REGION}
    env |= {"AWS_ENDPOINT_URL": endpoint, "SKYPILOT_DISABLE_LOCAL_API_SERVER": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    S3Store.put_file, S3Store.put_bytes = put_file, put_bytes
    sky.jobs.launch, sky.stream_and_get = (lambda task, name=None, **kw: "request-1"), (lambda r: ([1], None))
    try:
        bucket = make_bucket(endpoint)
        hub = FakeHub(work / "hub")
        with hub as hub_url, use_endpoint(hub_url, home=work / "hf"):
            launch(
                "tiny",
                ["data.dataset=bench/corpus", "data.max_tokens=1000000000"],
                name="bench-hub",
                store=bucket.uri,
                root=work / "runs",
                hardware=Hardware(gpu="L40S", nodes=2, cloud="aws"),
            )
            launched = {"hub_bytes_read": hub.bytes_served, "store_bytes_written": sum(written.values())}
            launched["objects_written"] = sorted(written)
            written.clear()
            here = stage(
                DataConfig(dataset="bench/corpus", max_tokens=1_000_000_000), bucket.uri, vocab_size=2048
            )
            staged_here = {"hub_bytes_read": hub.bytes_served, "store_bytes_written": sum(written.values())}
    finally:
        S3Store.put_file, S3Store.put_bytes = real_file, real_bytes
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
    shards = sum(k.startswith("datasets/") and k.endswith(".bin") for k in launched["objects_written"])
    return {
        "cloud_launch": {**launched, "shard_objects_written": shards},
        "staging_here_instead": {**staged_here, "tokens": here.tokens},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stage_scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=24, help="parquet text for the throughput runs (default 24)")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions (default 2)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "stage_scaling.json"))
    args = ap.parse_args(argv)
    from model.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix="lmctl-bench-scaling-"))
    os.environ.setdefault("LMCTL_CACHE", str(work / "cache"))
    try:
        load_before = os.getloadavg()[0]
        data = make_parquet(work / "data", args.mb)
        tok_path = work / "tokenizer.json"
        Tokenizer.train(read_jsonl_texts(DEFAULT_CORPUS), 32768).save(tok_path)
        print(
            f"{args.mb:g} MB of text in {FILES} parquet files, {os.cpu_count()} cores, load {load_before:.2f}"
        )
        rows = throughput(data, tok_path, work, args.reps)
        print()
        print_table(
            rows,
            [
                ("units run (best of reps)", "variant", ""),
                ("tokens", "tokens", ",d"),
                ("seconds", "seconds", ".2f"),
                ("Mtok/s", "mtok_per_s", ".2f"),
                ("x ray 1 worker", "vs_ray_1", ".2f"),
            ],
        )
        uploads = launcher_bytes(make_parquet(work / "small", 2, files=4, seed=1), work)
        c, h = uploads["cloud_launch"], uploads["staging_here_instead"]
        print(
            f"\ncloud launch of a hub dataset: {c['hub_bytes_read']:,} bytes read from the hub, "
            f"{c['store_bytes_written']:,} bytes written to the bucket ({c['shard_objects_written']} shards: "
            f"{', '.join(c['objects_written'])}); staging it here instead: {h['hub_bytes_read']:,} read, "
            f"{h['store_bytes_written']:,} written"
        )
        load_after = os.getloadavg()[0]
        path = write_json(
            args.out,
            {
                "benchmark": "stage_scaling",
                "text_mb": args.mb,
                "files": FILES,
                "throughput": rows,
                "ray_2_vs_1": next(r["vs_ray_1"] for r in rows if r["variant"] == "ray_2_workers"),
                "launcher": uploads,
                "loadavg_before_after": [load_before, load_after],
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
