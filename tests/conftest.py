"""Shared fixtures: a tokenizer trained on the shipped corpus and a dataset staged with it."""

from pathlib import Path

import pytest

from model.config import DEFAULT_CORPUS, resolve
from model.shards import Manifest, prepare_dataset, read_jsonl_texts
from model.tokenizer import Tokenizer

TINY_VOCAB = resolve("tiny").model.vocab_size
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
