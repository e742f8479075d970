"""Byte-level BPE: lossless on any text and any bytes, deterministic, stable through save/load."""

import json
import os
import subprocess
import sys

import pytest
from conftest import TINY_VOCAB
from hypothesis import example, given, settings
from hypothesis import strategies as st

from model.config import DEFAULT_CORPUS
from model.tokenizer import EOT, Tokenizer

# every Unicode scalar value: all categories (controls, NUL, astral planes, combining marks) but
# lone surrogates, which are not valid Unicode and have no UTF-8 encoding
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",)))


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.fixture(scope="module")
def single_byte_ids(tiny_tokenizer) -> dict[int, int]:
    """byte value -> an id that decodes to exactly that one byte."""
    found = {}
    for i in range(tiny_tokenizer.vocab_size):
        b = tiny_tokenizer.decode_bytes([i])
        if len(b) == 1:
            found.setdefault(b[0], i)
    return found


@given(any_text)
@example("")
@example("\x00")
@example("a\u0301 e\u0301\u0302")  # combining marks
@example("👩‍👩‍👧 🇫🇷 😀\U0010fffd")  # ZWJ sequence, flag, astral planes
@example("\r\n\t \x7f\x85\u2028  trailing   ")
@example(f"a{EOT}b")
@settings(max_examples=300, deadline=None)
def test_text_round_trip(tiny_tokenizer, s):
    ids = tiny_tokenizer.encode(s)
    assert tiny_tokenizer.decode(ids) == s
    assert tiny_tokenizer.decode_bytes(ids) == s.encode("utf-8")


@given(st.binary(max_size=64).filter(_is_utf8))
@settings(max_examples=200, deadline=None)
def test_valid_utf8_bytes_round_trip(tiny_tokenizer, b):
    s = b.decode("utf-8")
    assert tiny_tokenizer.decode_bytes(tiny_tokenizer.encode(s)) == b


def test_every_byte_is_reachable(single_byte_ids):
    assert sorted(single_byte_ids) == list(range(256))


@given(st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_decode_bytes_is_exact_for_any_bytes(tiny_tokenizer, single_byte_ids, b):
    """Even bytes that are not UTF-8 come back exactly: no replacement characters."""
    assert tiny_tokenizer.decode_bytes([single_byte_ids[x] for x in b]) == b


@given(st.lists(st.integers(0, TINY_VOCAB - 1), max_size=32))
@settings(max_examples=200, deadline=None)
def test_decode_is_lossy_utf8_of_decode_bytes(tiny_tokenizer, ids):
    """decode() may cut a character; it then shows U+FFFD exactly where Python's decoder would."""
    assert tiny_tokenizer.decode(ids) == tiny_tokenizer.decode_bytes(ids).decode("utf-8", errors="replace")


def test_streaming_a_split_character(tiny_tokenizer):
    s = "😀"  # 4 UTF-8 bytes; nothing in Shakespeare merges them into one token
    ids = tiny_tokenizer.encode(s)
    assert len(ids) > 1
    pieces = [tiny_tokenizer.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == s.encode()
    assert "\ufffd" in tiny_tokenizer.decode(ids[:1])


def test_trained_shape(tiny_tokenizer, corpus_texts):
    tok = tiny_tokenizer
    assert tok.vocab_size == TINY_VOCAB
    assert tok.eot_id == tok.backend.token_to_id(EOT)
    assert tok.decode([tok.eot_id]) == EOT
    assert tok.backend.post_processor is None
    # merges were learned: common words are a single token
    assert len(tok.encode(" the")) == 1
    assert len(tok.encode(corpus_texts[0])) < len(corpus_texts[0].encode()) / 2


def test_literal_end_of_text_in_a_document_is_not_a_boundary(tiny_tokenizer):
    ids = tiny_tokenizer.encode(f"the end{EOT}next")
    assert tiny_tokenizer.eot_id not in ids
    assert tiny_tokenizer.encode_batch([EOT]) == [tiny_tokenizer.encode(EOT)]


def test_encode_batch_matches_encode(tiny_tokenizer, corpus_texts):
    texts = [t[:2000] for t in corpus_texts] + ["", "x"]
    assert tiny_tokenizer.encode_batch(texts) == [tiny_tokenizer.encode(t) for t in texts]


def test_training_is_deterministic(corpus_texts):
    texts = corpus_texts[:4]
    a, b = Tokenizer.train(texts, 600), Tokenizer.train(texts, 600)
    assert a.backend.to_str() == b.backend.to_str()
    assert a.sha256 == b.sha256
    c = Tokenizer.train(texts[:3], 600)
    assert c.sha256 != a.sha256


@pytest.mark.slow
def test_training_is_deterministic_across_processes_and_thread_counts(corpus_texts):
    """tokenizers trains on a Rust thread pool: the result must not depend on it or on hash seeds."""
    here = Tokenizer.train(corpus_texts, 1024).sha256
    code = (
        "from model.shards import read_jsonl_texts; from model.tokenizer import Tokenizer; "
        f"print(Tokenizer.train(list(read_jsonl_texts({str(DEFAULT_CORPUS)!r})), 1024).sha256)"
    )
    for threads in ("1", "2"):
        env = {**os.environ, "RAYON_NUM_THREADS": threads, "PYTHONHASHSEED": threads}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == here


def test_vocab_size_too_small_names_the_minimum():
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train(["abc"], 256)
    with pytest.raises(ValueError, match="at least 258"):
        Tokenizer.train(["abc"], 100, special_tokens=(EOT, "<pad>"))
    tok = Tokenizer.train(["abc"], 257)  # the minimum itself works: bytes + EOT, no merges
    assert tok.vocab_size == 257
    assert tok.decode(tok.encode("héllo\x00")) == "héllo\x00"


def test_save_load_round_trip(tiny_tokenizer, tmp_path, corpus_texts):
    path = tmp_path / "sub" / "tokenizer.json"
    tiny_tokenizer.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    json.loads(path.read_text())
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == tiny_tokenizer.sha256
    assert loaded.eot_id == tiny_tokenizer.eot_id
    sample = corpus_texts[3][:5000] + " 😀 \x00"
    assert loaded.encode(sample) == tiny_tokenizer.encode(sample)
    loaded.save(tmp_path / "again.json")
    assert Tokenizer.load(tmp_path / "again.json").sha256 == tiny_tokenizer.sha256


def test_sha256_ignores_json_formatting(tiny_tokenizer, tmp_path):
    path = tmp_path / "compact.json"
    path.write_text(tiny_tokenizer.backend.to_str(pretty=False))
    assert Tokenizer.load(path).sha256 == tiny_tokenizer.sha256


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers JSON"):
        Tokenizer.load(bad)


def test_load_rejects_a_tokenizer_that_is_not_byte_level(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    sentencepiece_like = HF(models.WordLevel({"▁hello": 0, "<unk>": 1}, unk_token="<unk>"))
    sentencepiece_like.add_special_tokens([EOT])
    path = tmp_path / "sp.json"
    sentencepiece_like.save(str(path))
    with pytest.raises(ValueError, match="not byte-level"):
        Tokenizer.load(path)
