"""Continued pretraining (--init-from): a run exported to Hugging Face and imported again starts where its
source ended, not at ln V; a run's checkpoint (run@step) the same; the source decides the model's shape and
the tokenizer; what cannot work is refused in one line, before anything is written."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import ConfigError, resolve
from model.inference import export_run
from model.metrics import read_metrics
from model.train import train
from orchestrator import runs
from orchestrator.init_source import with_init

REPO = Path(__file__).resolve().parent.parent
QUICK = ["train.eval_every=40", "train.log_every=1", "train.evals=[]", "train.samples=[]"]


@pytest.fixture(scope="module")
def source(tiny_dataset, tmp_path_factory) -> Path:
    """A tiny run trained 40 steps on the shipped corpus: the source of the runs below."""
    data, _ = tiny_dataset
    run = tmp_path_factory.mktemp("source")
    train(resolve("tiny", [f"data.path={data}", "train.steps=40", *QUICK]), run)
    return run


def last_val(run: Path) -> float:
    return [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]


def first_loss(run: Path) -> float:
    return next(r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r)


def test_an_exported_run_imported_again_starts_at_its_loss(source, tiny_dataset, tmp_path):
    data, _ = tiny_dataset
    hf = export_run(source / "checkpoints", tmp_path / "hf")
    spec = with_init(
        resolve("tiny", [f"data.path={data}", "train.steps=2", *QUICK]), str(hf), tmp_path, [], False
    )
    assert spec.train.init_from == f"hf:{hf.resolve()}" and spec.data.tokenizer == spec.train.init_from
    assert spec.model == resolve("tiny").model  # the shape came back whole from config.json
    train(spec, tmp_path / "continued")
    ln_v = math.log(spec.model.vocab_size)
    assert abs(first_loss(tmp_path / "continued") - last_val(source)) < 0.25 < ln_v - last_val(source)
    fresh = tmp_path / "fresh"
    train(resolve("tiny", [f"data.path={data}", "train.steps=2", *QUICK]), fresh)
    assert first_loss(fresh) > last_val(source) + 1.0  # a fresh start is far above: the import did something


def test_a_run_at_a_step_is_a_source_too(source, tiny_dataset, tmp_path):
    """`dev@40`: a run of the runs folder at a committed step; its data's tokenizer stages the new data."""
    data, _ = tiny_dataset
    root = tmp_path / "runs"
    (root / "src").mkdir(parents=True)
    record = runs.new_record("src", "local", "finished", "tiny", "", 2, resolve("tiny"))
    record.checkpoints = str(source / "checkpoints")
    runs.write_record(root / "src", record)
    spec = with_init(
        resolve("tiny", [f"data.path={data}", "train.steps=2", *QUICK]), "src@40", root, [], False
    )
    assert spec.train.init_from == f"{source / 'checkpoints'}@40"
    assert spec.data.tokenizer == f"{data}/tokenizer.json"
    train(spec, tmp_path / "continued")
    assert abs(first_loss(tmp_path / "continued") - last_val(source)) < 0.25
    with pytest.raises(ConfigError, match="src@39: not a committed checkpoint; committed steps: 40"):
        with_init(resolve("tiny"), "src@39", root, [], False)
    with pytest.raises(ConfigError, match="its checkpoints are on this machine"):
        with_init(resolve("tiny"), "src", root, [], True)


def test_what_cannot_work_is_refused_in_one_line(source, tiny_dataset, tmp_path):
    hf = export_run(source / "checkpoints", tmp_path / "hf")
    cases = [
        ("nowhere/at/all", [], False, "not a run in"),
        (str(hf), ["model.n_layers=6"], False, "only model.seq_len may be set"),
    ]
    for src, overrides, cloud, says in cases:
        with pytest.raises(ConfigError, match=says) as e:
            with_init(resolve("tiny", overrides), src, tmp_path, overrides, cloud)
        assert "\n" not in str(e.value)
    other_tokenizer = resolve("tiny", [f"data.path={other_data(tmp_path)}"])
    with pytest.raises(ConfigError, match="was tokenized by another tokenizer than the source's"):
        with_init(other_tokenizer, str(hf), tmp_path, [], False)
    hand_edited = ["model.n_layers=2", f"train.init_from=hf:{hf}", f"data.path={tiny_dataset[0]}"]
    other = resolve("tiny", hand_edited)
    with pytest.raises(ConfigError, match="another model shape: n_layers 4 \\(run: 2\\)"):
        train(other, tmp_path / "other")


def test_launch_print_config_shows_the_source_s_shape(source, tmp_path):
    hf = export_run(source / "checkpoints", tmp_path / "hf")
    argv = [
        "launch",
        "--mode",
        "local",
        "--init-from",
        str(hf),
        "--override",
        "model.seq_len=64",
        "--print-config",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *argv], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert f"init_from: hf:{hf.resolve()}" in out.stdout and "seq_len: 64" in out.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *argv[:-1], "--tokenizer", "x.json"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "staged with the source's tokenizer" in refused.stderr


def test_a_cloud_run_from_a_folder_here_reads_its_copy_in_the_store(source, tmp_path, s3_bucket, monkeypatch):
    """A Hugging Face folder on this machine reaches a cloud run's pods through the run's store: the launch
    puts its files at runs/<name>/init/ (upload_folder), and the weights and tokenizer read back from there
    are the folder's."""
    import torch

    from model.init_from import initial_state
    from model.store import open_store
    from orchestrator.init_source import upload_folder
    from orchestrator.stage import load_given_tokenizer

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    monkeypatch.setenv("LMCTL_CACHE", str(tmp_path / "cache"))
    hf = export_run(source / "checkpoints", tmp_path / "hf")
    local = with_init(resolve("tiny"), str(hf), tmp_path, [], True)
    pods = upload_folder(local, s3_bucket.uri, "cont")
    copy = f"{s3_bucket.uri}/runs/cont/init"
    assert pods.train.init_from == f"hf:{copy}" and pods.data.tokenizer == f"{copy}/tokenizer.json"
    assert set(open_store(copy).list()) >= {"config.json", "model.safetensors", "tokenizer.json"}
    want, got = (
        initial_state(local.train.init_from, local.model),
        initial_state(pods.train.init_from, pods.model),
    )
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert load_given_tokenizer(pods.data, None).sha256 == load_given_tokenizer(local.data, None).sha256


def other_data(tmp_path: Path) -> Path:
    """A dataset staged with a tokenizer of its own (not the source run's)."""
    from model.config import DEFAULT_CORPUS
    from model.shards import prepare_dataset, read_jsonl_texts
    from model.tokenizer import Tokenizer

    texts = list(read_jsonl_texts(DEFAULT_CORPUS))[:2]
    prepare_dataset(texts, Tokenizer.train(texts, 600), tmp_path / "other", 50_000, 0.1, dataset="other")
    return tmp_path / "other"
