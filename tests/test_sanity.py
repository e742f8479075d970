"""Errors a retry would repeat fail a run once, with their cause as its message; warnings about runs that are
allowed but rarely meant (days on this machine, data seen more than once); a .txt file is one document."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import chaos
import numpy as np
import pytest

from model.config import DataConfig, resolve
from model.data import TokenDataset
from model.errors import ConfigError, DataError
from model.hardware import cpu_peak_flops
from model.shards import MANIFEST, TOKENIZER, Manifest, read_shard, write_manifest, write_shard
from model.tokenizer import Tokenizer
from orchestrator import runs, sanity
from orchestrator.stage import StageError, content_hash, resolve_source, stage, tokenizer_recipe

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- errors a retry would repeat


def foreign_shards(out: Path, tokenizer_dir: Path, vocab_size: int, high: int) -> Path:
    """A dataset folder whose shards hold token ids up to `high`, beyond its manifest's vocab_size: shards
    that do not belong to their manifest. Seeded; train 20,000 tokens, val 2,000."""
    rng = np.random.default_rng(0)
    out.mkdir()
    shutil.copy(tokenizer_dir / TOKENIZER, out / TOKENIZER)
    train = write_shard(out / "train_000000.bin", rng.integers(0, high, 20_000), "uint16")
    val = write_shard(out / "val_000000.bin", rng.integers(0, high, 2_000), "uint16")
    manifest = Manifest.from_json((tokenizer_dir / MANIFEST).read_text())
    bad = manifest.model_copy(
        update=dict(vocab_size=vocab_size, train=[train], val=[val], train_tokens=20_000, val_tokens=2_000)
    )
    write_manifest(out, bad)
    return out


def test_token_ids_beyond_the_vocabulary_are_a_data_error(tmp_path, tiny_dataset):
    """The embedding would fail on them (on a GPU, with a device-side assert): the batch is refused first."""
    folder = foreign_shards(tmp_path / "foreign", tiny_dataset[0], vocab_size=2048, high=4096)
    ds = TokenDataset(folder, "train", 128)
    with pytest.raises(DataError, match=r"^data error: token id \d+ >= vocab_size 2048 of the manifest"):
        ds.sequences(np.arange(8))


def test_a_data_error_keeps_its_message_through_pickling():
    """Ray sends a worker's exception to the driver pickled: the message must not grow a second prefix."""
    err = pickle.loads(pickle.dumps(DataError("token id 5000 >= vocab_size 4096")))
    assert isinstance(err, ConfigError) and str(err) == "data error: token id 5000 >= vocab_size 4096"


def test_ray_retries_transient_failures_and_raises_permanent_ones_at_once():
    from ray.train import FailureConfig, WorkerGroupError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    from orchestrator.failures import RetryTransientOnly, failure_message

    def group_error(failures: dict[int, Exception]) -> WorkerGroupError:
        return WorkerGroupError("rank 0 failed\nwith a traceback", failures)

    policy = RetryTransientOnly(FailureConfig(max_failures=3))
    transient = group_error({0: RuntimeError("Connection reset by peer\nmore"), 1: OSError("gone")})
    assert [policy.make_decision(transient) for _ in range(4)] == [FailureDecision.RETRY] * 3 + [
        FailureDecision.RAISE
    ]
    assert failure_message(transient) == "RuntimeError: Connection reset by peer"

    policy = RetryTransientOnly(FailureConfig(max_failures=3))
    permanent = group_error({0: RuntimeError("collateral: the peer left"), 1: DataError("token id 9 >= 8")})
    assert policy.make_decision(permanent) == FailureDecision.RAISE
    assert failure_message(permanent) == "data error: token id 9 >= 8"
    assert failure_message(group_error({1: ConfigError("set model.vocab_size >= 2048")})) == (
        "set model.vocab_size >= 2048"
    )


@pytest.fixture
def lab(tmp_path) -> Iterator[dict[str, str]]:
    """Runs of their own (runs folder, store, cache); none left training after the test, whatever happens."""
    env = chaos.lab_env(tmp_path / "lab")
    yield env
    for path in runs.list_runs(Path(env["LMCTL_RUNS_DIR"])):
        if session := runs.read_record(path).session:
            runs.kill_session(session)


@pytest.mark.slow
def test_a_data_error_in_the_loop_fails_the_run_once_and_status_names_it(lab, tmp_path, tiny_dataset):
    """Ray would restart the workers 3 times over (FailureConfig) for an error each restart repeats; the run
    is attempted once, and `lmctl status` shows the cause rather than Ray's WorkerGroupError. The driver's log
    also warns that the 20 steps are 2 passes over the 20,000 train tokens."""
    folder = foreign_shards(tmp_path / "foreign", tiny_dataset[0], vocab_size=2048, high=4096)
    args = ["--override", f"data.path={folder}", "--override", "train.steps=20"]
    out = chaos.lmctl(
        lab, "launch", "--mode", "local", "--config", "tiny", "--name", "bad", *args, "--foreground"
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr

    log = chaos.log_text(lab, "bad")
    assert log.count("workers started") == 1, log  # one attempt: no restart
    assert "warning: 2.0 epochs: the run's 41.0K tokens are 2.0 passes over the 20.0K staged train" in log
    s = chaos.status(lab, "bad")
    assert s["state"] == "failed" and s["step"] == 0, s
    assert (
        s["message"].startswith("data error: token id ")
        and ">= vocab_size 2048 of the manifest" in s["message"]
    )
    assert "\n" not in s["message"] and "WorkerGroupError" not in s["message"]
    assert chaos.nothing_left(lab, "bad")


# ---------------------------------------------------------------- warnings


def test_a_local_run_that_would_take_days_says_so_with_an_estimate():
    spec = resolve("1b", [])
    message = sanity.slow_local_run(spec, "1b", "this CPU (2 cores)", cpu_peak_flops(2))
    # 25,000 steps x 1M tokens x 7.88 GFLOP a token, at 40% of 2 x 100 GFLOP/s: 29,874 days
    assert message.startswith("1b for 25000 steps on this CPU (2 cores): about 29873.9 days (10 tokens/s")
    assert message.endswith("try --config tiny (one step of 1b alone takes about 28.7 h here)")

    assert sanity.slow_local_run(resolve("tiny", []), "tiny", "this CPU (2 cores)", cpu_peak_flops(2)) is None
    long_tiny = resolve("tiny", ["train.steps=1000000"])
    message = sanity.slow_local_run(long_tiny, "tiny", "this CPU (2 cores)", cpu_peak_flops(2))
    assert "about 2.1 days" in message and message.endswith(
        "try --override train.steps=19868 (about an hour here)"
    )
    assert sanity.slow_local_run(spec, "1b", "8 x H200", 8 * 989e12) is None  # a day is the threshold


def test_launch_warns_on_stderr_and_keeps_json_clean(tmp_path):
    """A dry-run launch of 1b on this machine's CPU: the warning on stderr, the record alone on stdout."""
    env = chaos.lab_env(tmp_path)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU estimate, whatever GPUs the machine has
    cmd = [sys.executable, "-m", "orchestrator.cli", "launch", "--mode", "local", "--config", "1b"]
    out = subprocess.run([*cmd, "--dry-run", "--json"], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["preset"] == "1b"
    [warning] = [line for line in out.stderr.splitlines() if line.startswith("warning: ")]
    assert warning.startswith("warning: 1b for 25000 steps on this CPU (") and " days (" in warning


def test_a_run_that_sees_its_data_more_than_once_says_how_often():
    manifest = Manifest(
        dataset="d", tokenizer_sha256="0" * 64, vocab_size=4096, eot_id=0, dtype="uint16", shard_tokens=1,
        val_fraction=0.01, train_tokens=480_000_000,
    )  # fmt: skip
    spec = resolve("1b", ["train.steps=1144"])  # 1144 x 1,048,576 = 1.2B tokens
    assert sanity.epochs_seen(spec, manifest) == (
        "2.5 epochs: the run's 1.2B tokens are 2.5 passes over the 480.0M staged train tokens (stage more "
        "data, or lower train.steps)"
    )
    assert sanity.epochs_seen(resolve("1b", ["train.steps=457"]), manifest) is None  # 1.0 passes


# ---------------------------------------------------------------- text files


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(
        ["To be, or not to be: that is the question.\nWhether 'tis nobler in the mind"] * 4, 300
    ).save(path)
    return path


def staged_documents(result, tok: Tokenizer) -> list[str]:
    """The staged text, train then val, cut at each end-of-text token: the documents the model sees."""
    folder = Path(result.dataset_uri.removeprefix("file://"))
    ids = [
        int(t)
        for split in ("train", "val")
        for s in result.manifest.shards(split)
        for t in read_shard(folder / s.name)
    ]
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == tok.eot_id:
            docs.append(tok.decode(ids[start:i]))
            start = i + 1
    assert start == len(ids), "the staged tokens end with an end-of-text token"
    return docs


def test_a_txt_file_is_one_document(tmp_path, tok_path):
    text = "To be, or not to be:\nthat is the question.\nWhether 'tis nobler in the mind\n"
    (tmp_path / "hamlet.txt").write_text(text)
    r = stage(dict(dataset=str(tmp_path / "hamlet.txt"), tokenizer=str(tok_path)), str(tmp_path / "store"))
    assert r.documents == 1
    assert staged_documents(r, Tokenizer.load(tok_path)) == [text]  # line breaks kept, one end-of-text

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(text)
    (folder / "b.txt").write_text("The rest is silence.\n")
    r = stage(dict(dataset=str(folder), tokenizer=str(tok_path)), str(tmp_path / "store"))
    assert r.documents == 2
    assert sorted(staged_documents(r, Tokenizer.load(tok_path))) == sorted([text, "The rest is silence.\n"])


def test_the_text_split_rule_is_part_of_the_staging_hash(tmp_path, tok_path):
    """A .txt staged before, one document per line, is not reused as if it were split by file; the hash of
    other formats (the shipped corpus's staged copy, for one) stays what it was."""
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    data = DataConfig(dataset=str(tmp_path / "a.txt"), tokenizer=str(tok_path))
    source = resolve_source(data)
    recipe = tokenizer_recipe(Tokenizer.load(tok_path), 300, 1000)
    by_line = dataclasses.replace(
        source, identity={k: v for k, v in source.identity.items() if k != "sample_by"}
    )
    assert content_hash(data, source, recipe) != content_hash(data, by_line, recipe)

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    assert "sample_by" not in resolve_source(DataConfig(dataset=str(tmp_path / "a.jsonl"))).identity


def test_a_folder_mixing_txt_with_other_formats_is_refused(tmp_path):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("one\n")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"text": "two"}\n')
    with pytest.raises(StageError, match=r"mixes \.txt files with json files: stage each kind from a folder"):
        resolve_source(resolve("tiny", [f"data.dataset={tmp_path / 'mixed'}"]).data)
