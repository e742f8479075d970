"""Shared fixtures: a tokenizer trained on the shipped corpus and a dataset staged with it.

Devices: the suite is one deterministic CPU suite on every machine. Unless the tests asked for are the `gpu`
ones (`pytest -m gpu`), GPUs are hidden before anything initialises CUDA, so that train(), torchrun and Ray
workers in tests (and the processes they start) all run where CI runs them. `gpu` tests skip without CUDA.
"""

import os
from pathlib import Path

import pytest

from model.config import DEFAULT_CORPUS, resolve
from model.shards import Manifest, prepare_dataset, read_jsonl_texts
from model.tokenizer import Tokenizer

TINY_VOCAB = resolve("tiny").model.vocab_size


def _selects_gpu_tests(config) -> bool:
    expr = (config.option.markexpr or "").replace(" ", "")
    return "gpu" in expr and "notgpu" not in expr


def pytest_configure(config):
    if not _selects_gpu_tests(config):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_SHARD_TOKENS = 65536  # small enough that the corpus spans several train shards


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    """The 14 documents of configs/data/shakespeare.jsonl."""
    return list(read_jsonl_texts(DEFAULT_CORPUS))


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_texts) -> Tokenizer:
    return Tokenizer.train(corpus_texts, TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, corpus_texts, tiny_tokenizer) -> tuple[Path, Manifest]:
    """A staged dataset directory (manifest.json, tokenizer.json, shards) of the shipped corpus.

    Shared by the session: treat it as read-only.
    """
    out = tmp_path_factory.mktemp("tiny_dataset")
    manifest = prepare_dataset(
        corpus_texts, tiny_tokenizer, out, TINY_SHARD_TOKENS, val_fraction=0.05, dataset="shakespeare"
    )
    return out, manifest


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, corpus_texts) -> str:
    """A staged dataset of 3 documents with a 512-token vocabulary: for tests/test_train.py's SMALL model."""
    texts = corpus_texts[:3]
    out = tmp_path_factory.mktemp("small_data")
    prepare_dataset(
        texts, Tokenizer.train(texts, 512), out, 50_000, val_fraction=0.1, dataset="shakespeare-3"
    )
    return str(out)


# ---------------------------------------------------------------- loopback S3 (tests/s3.py)


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of moto's S3 server on a free 127.0.0.1 port, shared by the session; sets no env."""
    from s3 import start_moto

    server, endpoint = start_moto()
    yield endpoint
    server.stop()


@pytest.fixture
def s3_env(monkeypatch, tmp_path_factory):
    """Fake credentials and region for boto3, isolated from the user's ~/.aws, profile and endpoint vars."""
    from s3 import FAKE_KEY, FAKE_SECRET, REGION

    empty = tmp_path_factory.getbasetemp() / "no-aws-config"
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


@pytest.fixture
def s3_bucket(s3_server, s3_env):
    """A fresh bucket per test: an S3Bucket(uri="s3://<bucket>/lmctl", endpoint=<server URL>)."""
    from s3 import make_bucket

    return make_bucket(s3_server)
