"""`lmctl stage --cloud`: a hub dataset staged by a SkyPilot CPU job of its own, next to the hub and bucket.

Here (`submit`), nothing but the hub's answer about the revision: it is pinned to its commit, the dataset's
content hash (and so its URI in the store) is known before the job starts, and the job is a managed one that
SkyPilot reruns after a preemption, resuming from the units the store already holds. On the job's head node
(`python -m orchestrator.stage_job`, from tasks/stage.yaml), the staging runs with one Ray task per unit over
every node's CPUs. Several runs then train on the one staged copy (`lmctl launch --dataset <its URI>`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from model.config import ConfigError, DataConfig
from model.store import cache_root, open_store


def submit(
    spec: DataConfig, store_uri: str, *, vocab_size: int | None, sample_chars: int, cpus: int, nodes: int
) -> dict[str, Any]:
    """Submit the staging of `spec` as a managed CPU job; what it will commit, and the job's id (None when
    the dataset is already staged there: nothing is submitted)."""
    from orchestrator import cloud
    from orchestrator.render import render_stage_task
    from orchestrator.stage import (
        committed,
        content_hash,
        looks_local,
        resolve_source,
        tokenizer_recipe,
        trained_vocab,
    )

    if looks_local(spec.dataset):
        raise ConfigError(
            f"--cloud stages hub datasets; {spec.dataset} is a local path, which only this machine can read: "
            "stage it from here (leave out --cloud)"
        )
    if not store_uri.startswith("s3://"):
        raise ConfigError(
            f"--cloud needs a store the cloud can reach (s3://bucket/prefix), not {store_uri!r}"
        )
    if spec.tokenizer != "train":
        raise ConfigError(
            "--cloud trains the tokenizer on the job (--tokenizer train); a tokenizer.json on this machine "
            "cannot reach it: stage without --cloud, or leave out --tokenizer"
        )
    vocab = trained_vocab(vocab_size)  # a StageError: the CLI says it in one line
    store = open_store(store_uri)
    store.check()
    source = resolve_source(spec)  # the revision pinned to its commit: one hub API call, no data read
    digest = content_hash(spec, source, tokenizer_recipe(None, vocab, sample_chars))
    prefix = f"datasets/{digest}"
    facts = {"dataset": spec.dataset, "revision": source.revision, "dataset_uri": store.url(prefix)}
    if committed(store, prefix) is not None:
        return {**facts, "reused": True, "job_id": None, "name": None}
    name = f"lmctl-stage-{digest[:12]}"
    stage = {
        "data": spec.model_copy(update={"revision": source.revision}).model_dump(exclude={"path", "mixture"}),
        "vocab_size": vocab,
        "sample_chars": sample_chars,
    }
    task = cache_root() / "stage-jobs" / f"{name}.yaml"
    task.parent.mkdir(parents=True, exist_ok=True)
    task.write_text(render_stage_task(name, store_uri, stage, cpus, nodes))
    job_id = cloud.launch_job(task, name, cloud.secrets_from_env(store_uri))
    return {**facts, "reused": False, "job_id": job_id, "name": name}


def main(argv: list[str] | None = None) -> int:
    """On the job's head node: join the Ray cluster, stage LMCTL_STAGE into LMCTL_STORE, print the result."""
    from model.store import StoreError
    from orchestrator.driver import start_ray
    from orchestrator.progress import human
    from orchestrator.runs import say
    from orchestrator.stage import StageError, stage
    from orchestrator.stage_unit import RayUnits

    ap = argparse.ArgumentParser(prog="python -m orchestrator.stage_job", description=main.__doc__)
    ap.add_argument("--address", required=True, help="the Ray head to join (host:port)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes to wait for before staging")
    args = ap.parse_args(argv)
    job = json.loads(os.environ["LMCTL_STAGE"])
    start_ray(1, args.address, args.nodes)
    said = [time.monotonic()]

    def progress(facts: dict[str, Any]) -> None:
        if facts.get("tokens") and time.monotonic() - said[0] >= 30:
            said[0] = time.monotonic()
            say(f"{facts['phase']}: {human(facts['tokens'])} tokens, {human(facts['tokens_per_s'])} tokens/s")

    data = DataConfig(**job["data"])
    say(f"staging {data.dataset}@{data.revision} to {os.environ['LMCTL_STORE']}")
    try:
        result = stage(
            data,
            os.environ["LMCTL_STORE"],
            vocab_size=job["vocab_size"],
            sample_chars=job["sample_chars"],
            on_progress=progress,
            runner=RayUnits(),
        )
    except (StageError, StoreError) as e:
        say(f"failed: {e}")
        return 1
    nodes = result.nodes or 1
    say(f"staged {result.tokens:,} tokens in {result.units} units on {nodes} node(s): {result.dataset_uri}")
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
