"""Dataset mixtures end to end: `--dataset NAME:WEIGHT` twice or more, each source staged once with one
tokenizer, drawn by weight at batch time, what each source gave in metrics.jsonl and `status`."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from model.config import DEFAULT_CORPUS, ConfigError, load_spec
from model.metrics import read_metrics
from model.staged import staged_manifest
from model.store import open_store
from model.train import train
from orchestrator.launch import dataset_flags, resolve_spec
from orchestrator.stage import stage_for_run

SHORT = ["train.steps=8", "train.log_every=4", "train.eval_every=8", "train.checkpoint_every=8"]


def words_corpus(path, seed: int = 0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    path.write_text(
        "".join(json.dumps({"text": " ".join(rng.choices(words, k=200))}) + "\n" for _ in range(300))
    )
    return path


def test_dataset_flags_read_weights_and_leave_uris_and_single_datasets_alone():
    assert dataset_flags(["org/name"]) == (["data.dataset=org/name"], None)
    assert dataset_flags(["s3://bucket/datasets/abc"]) == (["data.path=s3://bucket/datasets/abc"], None)
    overrides, sources = dataset_flags(["a/b:0.7", "s3://bucket/datasets/abc:0.3", "c/d"])
    assert overrides == [] and [s["weight"] for s in sources] == [0.7, 0.3, 1.0]
    assert [s["dataset"] for s in sources] == ["a/b", "s3://bucket/datasets/abc", "c/d"]
    assert [s["path"] for s in sources] == [None, "s3://bucket/datasets/abc", None]  # staged: not again
    with pytest.raises(ConfigError, match="give --dataset twice or more"):
        dataset_flags(["a/b:0.7"])
    with pytest.raises(ConfigError, match="must be a number, e.g. c/d:0.3"):
        dataset_flags(["a/b:0.7", "c/d:x"])
    with pytest.raises(ConfigError, match="weight"):
        resolve_spec("tiny", [], mixture=dataset_flags(["a/b:0.7", "c/d:-1"])[1])


def test_a_mixture_is_staged_once_per_source_with_one_tokenizer_and_trains_by_weight(tmp_path):
    other = words_corpus(tmp_path / "words.jsonl")
    mixture = dataset_flags([f"{DEFAULT_CORPUS}:0.7", f"{other}:0.3"])[1]
    spec = resolve_spec("tiny", SHORT, mixture=mixture)
    record = SimpleNamespace(store=f"file://{tmp_path}/store", mode="local", name="mix")
    run = tmp_path / "run"
    run.mkdir()
    staged = stage_for_run(spec, record, run)
    first, second = [staged_manifest(s.path) for s in staged.data.mixture]
    assert first.tokenizer_sha256 == second.tokenizer_sha256  # the second staged with the first's tokenizer
    assert staged.data.path == staged.data.mixture[0].path and load_spec(run / "config.yaml") == staged
    datasets = lambda: {k.split("/")[1] for k in open_store(record.store).list("datasets")}  # noqa: E731
    assert len(datasets()) == 2
    (tmp_path / "run2").mkdir()
    again = stage_for_run(resolve_spec("tiny", SHORT, mixture=mixture), record, tmp_path / "run2")
    assert [s.path for s in again.data.mixture] == [s.path for s in staged.data.mixture] and len(
        datasets()
    ) == 2

    assert train(staged, run, device="cpu").step == 8
    logged = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    drawn = logged[-1]["tokens_by_source"]
    assert list(drawn) == [str(DEFAULT_CORPUS), str(other)]
    assert (
        sum(drawn.values()) == logged[-1]["tokens"]
        and 0.5 < drawn[str(other)] / logged[-1]["tokens"] / 0.3 < 1.5
    )


def test_a_mixture_whose_sources_are_not_staged_is_refused_by_the_loop(tmp_path):
    spec = resolve_spec(
        "tiny", [*SHORT, f"data.path={tmp_path}"], mixture=[{"dataset": "a/b"}, {"dataset": "c/d"}]
    )
    with pytest.raises(ConfigError, match="not staged"):
        train(spec, tmp_path / "run", device="cpu")
