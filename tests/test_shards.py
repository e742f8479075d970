"""Token shards, the manifest commit marker, the streaming packer and serial staging."""

import json

import numpy as np
import pytest

from model.shards import (
    HEADER,
    MANIFEST,
    Manifest,
    ShardWriter,
    atomic_write,
    dtype_for_vocab,
    file_sha256,
    prepare_dataset,
    read_jsonl_texts,
    read_manifest,
    read_shard,
    verify,
    write_shard,
)
from model.tokenizer import Tokenizer


def _writer(tmp_path, **kw) -> ShardWriter:
    args = dict(
        eot_id=0,
        vocab_size=1000,
        shard_tokens=10,
        val_fraction=0.25,
        dataset="synthetic",
        tokenizer_sha256="0" * 64,
    )
    return ShardWriter(tmp_path, **(args | kw))


def _split_tokens(data_dir, manifest: Manifest, split: str) -> np.ndarray:
    parts = [np.asarray(read_shard(data_dir / s.name)) for s in manifest.shards(split)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# ---------------------------------------------------------------- shard files


def test_dtype_for_vocab():
    assert dtype_for_vocab(4096) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32
    with pytest.raises(ValueError, match="vocab_size 0"):
        dtype_for_vocab(0)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_shard_round_trip(tmp_path, dtype):
    top = np.iinfo(dtype).max
    tokens = np.array([0, 1, 2, top - 1, top] + list(range(1000)), dtype=np.int64)
    info = write_shard(tmp_path / "s.bin", tokens, dtype)
    assert info.name == "s.bin" and info.tokens == tokens.size
    assert (
        info.bytes
        == (tmp_path / "s.bin").stat().st_size
        == HEADER.size + tokens.size * np.dtype(dtype).itemsize
    )
    assert info.sha256 == file_sha256(tmp_path / "s.bin")
    back = read_shard(tmp_path / "s.bin")
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, tokens)
    with pytest.raises(ValueError):  # read-only memmap
        back[0] = 7


def test_empty_shard_round_trip(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, np.int64), "uint16")
    assert read_shard(tmp_path / "e.bin").size == 0


def test_write_shard_rejects_ids_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="does not fit uint16"):
        write_shard(tmp_path / "s.bin", np.array([1, 65536]), "uint16")
    with pytest.raises(ValueError, match="does not fit uint32"):
        write_shard(tmp_path / "s.bin", np.array([-1, 3]), "uint32")
    with pytest.raises(ValueError, match="not supported"):
        write_shard(tmp_path / "s.bin", np.array([1]), "int8")
    assert not (tmp_path / "s.bin").exists()


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100), "uint16")
    return path


def test_truncated_shard_is_named(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])
    with pytest.raises(ValueError, match=r"truncated: header says 100 tokens = 232 bytes, file has 229"):
        read_shard(shard)
    shard.write_bytes(data + b"\0\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_shard(shard)
    shard.write_bytes(data[:10])
    with pytest.raises(ValueError, match="not a token shard"):
        read_shard(shard)


@pytest.mark.parametrize(
    "offset, value, message",
    [(0, b"X", "not a token shard"), (8, b"\x09", "format version 9"), (12, b"\x07", "unknown dtype code 7")],
)
def test_corrupt_header_is_named(shard, offset, value, message):
    data = bytearray(shard.read_bytes())
    data[offset : offset + 1] = value
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=message):
        read_shard(shard)


def test_foreign_file_and_missing_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(np.arange(64, dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match="not a token shard"):
        read_shard(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="does not exist"):
        read_shard(tmp_path / "nope.bin")


def test_interrupted_atomic_write_leaves_nothing(tmp_path):
    def chunks():
        yield b"partial"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f.bin", chunks())
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f.bin", chunks())
    assert (tmp_path / "f.bin").read_bytes() == b"old"  # the previous version survives intact
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ---------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path):
    w = _writer(tmp_path)
    for n in (7, 3, 12, 5):
        w.add(list(range(1, n + 1)))
    manifest = w.close()
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert read_manifest(tmp_path) == manifest
    raw = json.loads((tmp_path / MANIFEST).read_text())
    assert raw["format_version"] == 1 and raw["dtype"] == "uint16" and raw["dataset"] == "synthetic"
    assert raw["created"] is None  # the same bytes whenever it is written
    old = {**raw, "created": "2026-01-02T03:04:05+00:00"}  # written before STAGE_VERSION 2: still read
    assert Manifest.from_json(json.dumps(old)).train == manifest.train


def test_manifest_errors(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json .* not staged"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 1, "dataset": "d"}))
    with pytest.raises(ValueError, match="invalid manifest"):
        read_manifest(tmp_path)


def test_verify(tmp_path):
    w = _writer(tmp_path)
    for _ in range(6):
        w.add(list(range(1, 8)))
    manifest = w.close()
    verify(tmp_path, manifest, checksums=True)

    first = tmp_path / manifest.train[0].name
    data = bytearray(first.read_bytes())
    data[-1] ^= 1  # same size, different content: only the checksum sees it
    first.write_bytes(bytes(data))
    verify(tmp_path, manifest)
    with pytest.raises(ValueError, match="train_000000.bin sha256 differs"):
        verify(tmp_path, manifest, checksums=True)

    first.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match="train_000000.bin has 50 bytes, manifest says 52"):
        verify(tmp_path, manifest)
    (tmp_path / manifest.val[0].name).unlink()
    with pytest.raises(ValueError, match="val_000000.bin is missing"):
        verify(tmp_path, manifest)


# ---------------------------------------------------------------- writer


def test_writer_cuts_exact_shards_and_separates_documents(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, size=int(rng.integers(0, 40))).tolist() for _ in range(60)]
    w = _writer(tmp_path, shard_tokens=16)
    routed = {"train": [], "val": []}
    for doc in docs:
        routed[w.add(doc)].append(doc)
    manifest = w.close()

    for split in ("train", "val"):
        shards = manifest.shards(split)
        assert shards, split
        assert [s.name for s in shards] == [f"{split}_{i:06d}.bin" for i in range(len(shards))]
        assert all(s.tokens == 16 for s in shards[:-1]) and 0 < shards[-1].tokens <= 16
        expected = [t for doc in routed[split] for t in [*doc, 0]]  # EOT (0) after every document
        np.testing.assert_array_equal(_split_tokens(tmp_path, manifest, split), expected)
        assert getattr(manifest, f"{split}_tokens") == len(expected) == sum(s.tokens for s in shards)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3])
def test_writer_val_fraction(tmp_path, fraction):
    rng = np.random.default_rng(1)
    w = _writer(tmp_path, shard_tokens=4096, val_fraction=fraction)
    longest = 0
    for _ in range(2000):
        doc = [1] * int(rng.integers(5, 60))
        longest = max(longest, len(doc) + 1)
        w.add(doc)
        m = w.manifest
        total = m.train_tokens + m.val_tokens
        # the rule keeps val within one document of its share at every point of the stream
        assert fraction * total - longest <= m.val_tokens <= fraction * total + longest
    m = w.close()
    assert m.val_tokens / (m.train_tokens + m.val_tokens) == pytest.approx(fraction, abs=0.005)


def test_writer_val_fraction_zero_and_first_document(tmp_path):
    w = _writer(tmp_path / "a", val_fraction=0.0)
    assert [w.add([5, 6]) for _ in range(5)] == ["train"] * 5
    assert w.close().val == []
    w = _writer(tmp_path / "b", val_fraction=0.05)
    assert [w.add([5] * 100) for _ in range(3)] == ["train", "val", "train"]


def test_writer_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        _writer(tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="shard_tokens must be a positive integer, got 0"):
        _writer(tmp_path, shard_tokens=0)
    with pytest.raises(ValueError, match="eot_id 1000 is outside"):
        _writer(tmp_path, eot_id=1000)
    w = _writer(tmp_path)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 1000\)"):
        w.add([1, 1000])
    w.close()
    with pytest.raises(ValueError, match="after close"):
        w.add([1])


def test_writer_uses_uint32_for_large_vocab(tmp_path):
    w = _writer(tmp_path, vocab_size=100_000)
    w.add([99_999, 70_000])
    m = w.close()
    assert m.dtype == "uint32"
    np.testing.assert_array_equal(_split_tokens(tmp_path, m, "train"), [99_999, 70_000, 0])


def test_interrupted_writer_leaves_no_manifest(tmp_path):
    """A committed dataset that is re-staged is un-committed first; a crash mid-way leaves no manifest."""
    w = _writer(tmp_path)
    w.add(list(range(1, 30)))
    w.close()
    assert (tmp_path / MANIFEST).exists()

    def crash(path, info, split):
        if info.name == "train_000001.bin":
            raise RuntimeError("preempted")

    w = _writer(tmp_path, on_shard=crash)
    assert not (tmp_path / MANIFEST).exists()
    with pytest.raises(RuntimeError, match="preempted"):
        for _ in range(10):
            w.add(list(range(1, 8)))
    assert not (tmp_path / MANIFEST).exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_on_shard_sees_every_shard(tmp_path):
    seen = []
    w = _writer(tmp_path, on_shard=lambda path, info, split: seen.append((path.name, info.tokens, split)))
    for _ in range(8):
        w.add([3] * 6)
    m = w.close()
    assert sorted(seen) == sorted(
        (s.name, s.tokens, split) for split in ("train", "val") for s in m.shards(split)
    )


# ---------------------------------------------------------------- staging the shipped corpus


def test_prepared_corpus_equals_direct_tokenization(tiny_dataset, tiny_tokenizer, corpus_texts):
    data_dir, manifest = tiny_dataset
    assert read_manifest(data_dir) == manifest
    verify(data_dir, manifest, checksums=True)
    assert (
        Tokenizer.load(data_dir / "tokenizer.json").sha256
        == manifest.tokenizer_sha256
        == tiny_tokenizer.sha256
    )
    assert (manifest.vocab_size, manifest.eot_id, manifest.dtype) == (
        tiny_tokenizer.vocab_size,
        tiny_tokenizer.eot_id,
        "uint16",
    )
    assert len(manifest.train) > 1 and all(s.tokens == 65536 for s in manifest.train[:-1])

    # replay the routing rule on directly tokenized documents
    expected = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    for text in corpus_texts:
        doc = [*tiny_tokenizer.encode(text), tiny_tokenizer.eot_id]
        split = "val" if counts["val"] < 0.05 * (counts["train"] + counts["val"]) else "train"
        expected[split] += doc
        counts[split] += len(doc)
    assert expected["val"], "the 14-document corpus must still give val a document"
    for split in ("train", "val"):
        np.testing.assert_array_equal(_split_tokens(data_dir, manifest, split), expected[split])
    assert manifest.val_tokens / (manifest.train_tokens + manifest.val_tokens) < 0.2


def test_prepare_dataset_max_tokens_and_empty_input(tmp_path, tiny_tokenizer, corpus_texts):
    m = prepare_dataset(corpus_texts, tiny_tokenizer, tmp_path / "a", 4096, 0.1, "c", max_tokens=5000)
    first = len(tiny_tokenizer.encode(corpus_texts[0])) + 1
    assert m.train_tokens + m.val_tokens == first  # the first document alone passes 5000 tokens
    with pytest.raises(ValueError, match="no text to train on"):
        prepare_dataset(["", ""], tiny_tokenizer, tmp_path / "b", 4096, 0.1, "empty")
    assert not (tmp_path / "b" / MANIFEST).exists()


def test_read_jsonl_texts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "id": 1}\n\n{"text": "b\\u00e9"}\n')
    assert list(read_jsonl_texts(path)) == ["a", "bé"]
    path.write_text('{"text": "a"}\n{"body": "b", "title": "t"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: no field 'text'; fields present: 'body', 'title'"):
        list(read_jsonl_texts(path))
    path.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="field 'text' is a int, not a string"):
        list(read_jsonl_texts(path))
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match="d.jsonl:1: not valid JSON"):
        list(read_jsonl_texts(path))
    path.write_text('{"content": "x"}\n')
    assert list(read_jsonl_texts(path, text_field="content")) == ["x"]
