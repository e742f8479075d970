"""Staging: local formats, tokens equal to direct encoding, re-staging as a no-op, resume after a kill
(file:// and loopback S3), byte-identical staging through a faulty network, and one-line CLI errors."""

import gzip
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from s3 import FaultProxy, iam_auth

from model.config import DEFAULT_CORPUS, DataConfig
from model.shards import MANIFEST, TOKENIZER, Manifest, read_jsonl_texts, read_shard, verify
from model.store import S3Store, open_store
from model.tokenizer import Tokenizer
from orchestrator.cli import main
from orchestrator.stage import StageError, stage

REPO = Path(__file__).resolve().parent.parent
VOCAB = 512
SHARD = 2048  # ~10 train shards for the test documents
VAL = 0.1


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Work dirs under tmp, never ~/.cache; no hub access attempted by anything but the hub-id test."""
    monkeypatch.setenv("LMCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LMCTL_FAULT", raising=False)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """~60 documents of consecutive corpus lines, plus the awkward ones: empty, non-ASCII, a literal EOT."""
    lines = [ln for d in read_jsonl_texts(DEFAULT_CORPUS) for ln in d.split("\n") if ln.strip()]
    rng = random.Random(0)
    out = []
    for _ in range(60):
        k = rng.randint(5, 50)
        start = rng.randrange(len(lines) - k)
        out.append("\n".join(lines[start : start + k]))
    out[7] = ""  # skipped, as by prepare_dataset
    out[11] = "naïve café — 東京 🚀 " + out[11]
    out[23] = out[23] + " <|endoftext|> is just text here"
    return out


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(docs, VOCAB).save(path)
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d, "meta": {"n": i}}) + "\n")
    return path


@pytest.fixture
def data(tmp_path, docs) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", docs)


def expected(docs: list[str], tok: Tokenizer, val_fraction=VAL, max_tokens=None) -> dict[str, list[int]]:
    """The split rule, restated: a document goes to val while val holds less than val_fraction of all."""
    out = {"train": [], "val": []}
    for d in filter(None, docs):
        seq = tok.encode(d) + [tok.eot_id]
        n_val, n = len(out["val"]), len(out["train"]) + len(out["val"])
        out["val" if n_val < val_fraction * n else "train"] += seq
        if max_tokens is not None and n + len(seq) >= max_tokens:
            break
    return out


def local_dir(result) -> Path:
    assert result.dataset_uri.startswith("file://")
    return Path(result.dataset_uri[len("file://") :])


def staged_tokens(folder: Path, manifest: Manifest, split: str) -> list[int]:
    return [int(t) for s in manifest.shards(split) for t in read_shard(folder / s.name)]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) per file: a re-uploaded file gets a new inode (atomic replace)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def run_cli(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, "-m", "orchestrator.cli", "stage", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- file:// store


def test_stage_restage_and_tokens(tmp_path, data, docs):
    store = tmp_path / "store"
    spec = DataConfig(dataset=str(data), tokenizer="train", shard_tokens=SHARD, val_fraction=VAL)
    r = stage(spec, str(store), vocab_size=VOCAB, batch_chars=8000)  # many batches: order must hold
    folder = local_dir(r)
    assert not r.reused and folder.parent == store / "datasets" and folder.name == r.content_hash
    m = r.manifest
    assert len(m.train) >= 5 and m.val and m.dataset == str(data) and r.documents == len(docs) - 1
    verify(folder, Manifest.from_json((folder / MANIFEST).read_text()), checksums=True)
    tok = Tokenizer.load(folder / TOKENIZER)
    assert tok.sha256 == m.tokenizer_sha256 and tok.vocab_size == VOCAB
    want = expected(docs, tok)
    assert staged_tokens(folder, m, "train") == want["train"]
    assert staged_tokens(folder, m, "val") == want["val"]
    assert sorted(r.uploaded) == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
    )
    info = json.loads((folder / "stage.json").read_text())
    assert info["documents"] == r.documents and info["tokenizer"]["vocab_size"] == VOCAB

    before = snapshot(folder)
    again = stage(spec, f"file://{store}", vocab_size=VOCAB)
    assert again.reused and again.uploaded == [] and again.dataset_uri == r.dataset_uri
    assert again.manifest == m and again.documents == r.documents
    assert snapshot(folder) == before  # nothing rewritten

    (folder / m.train[1].name).unlink()  # a broken copy is not "staged": it is repaired
    fixed = stage(spec, str(store), vocab_size=VOCAB)
    assert not fixed.reused and [n for n in fixed.uploaded if n.endswith(".bin")] == [m.train[1].name]
    assert TOKENIZER not in fixed.uploaded  # the stored tokenizer was reused, not retrained
    verify(folder, Manifest.from_json((folder / MANIFEST).read_text()), checksums=True)


def test_the_hash_follows_content_not_names(tmp_path, data, tok_path):
    spec = dict(dataset=str(data), tokenizer=str(tok_path), shard_tokens=SHARD, val_fraction=VAL)
    a = stage(spec, str(tmp_path / "s"))
    copy = tmp_path / "elsewhere" / "renamed.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    assert stage(spec | {"dataset": str(copy)}, str(tmp_path / "s")).reused  # same bytes: same hash
    for change in ({"val_fraction": 0.2}, {"shard_tokens": 4096}, {"max_tokens": 5000}):
        assert stage(spec | change, str(tmp_path / "s")).content_hash != a.content_hash
    with open(data, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert stage(spec, str(tmp_path / "s")).content_hash != a.content_hash


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "txt", "parquet", "folder"])
def test_formats(tmp_path, docs, tok_path, fmt):
    """Every input form reaches the same tokens (text files: one document per file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    one_line = [d.replace("\n", " ") for d in docs]
    if fmt == "jsonl":
        src = write_jsonl(tmp_path / "d.jsonl", one_line)
    elif fmt == "jsonl.gz":
        src = tmp_path / "d.jsonl.gz"
        src.write_bytes(gzip.compress(write_jsonl(tmp_path / "plain.jsonl", one_line).read_bytes()))
    elif fmt == "txt":
        src = tmp_path / "txt"
        src.mkdir()
        for i, d in enumerate(one_line):
            (src / f"{i:03d}.txt").write_text(d)
    elif fmt == "parquet":
        src = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": one_line, "n": list(range(len(one_line)))}), src, row_group_size=16)
    else:
        src = tmp_path / "folder"
        src.mkdir()
        write_jsonl(src / "part-0.jsonl", one_line[:30])
        write_jsonl(src / "part-1.jsonl", one_line[30:])
        (src / ".hidden.jsonl").write_text('{"text": "not staged"}\n')
    r = stage(dict(dataset=str(src), tokenizer=str(tok_path), shard_tokens=SHARD), str(tmp_path / "store"))
    tok = Tokenizer.load(tok_path)
    want = expected(one_line, tok, val_fraction=0.05)
    folder = local_dir(r)
    assert staged_tokens(folder, r.manifest, "train") == want["train"]
    assert staged_tokens(folder, r.manifest, "val") == want["val"]


def test_text_field_and_max_tokens(tmp_path, docs, tok_path):
    src = write_jsonl(tmp_path / "c.jsonl", docs, field="content")
    tok = Tokenizer.load(tok_path)
    cap = 6000
    spec = DataConfig(dataset=str(src), text_field="content", tokenizer=str(tok_path), shard_tokens=SHARD)
    r = stage(spec.model_copy(update={"max_tokens": cap}), str(tmp_path / "store"), progress=True)
    want = expected(docs, tok, val_fraction=0.05, max_tokens=cap)
    folder = local_dir(r)
    assert staged_tokens(folder, r.manifest, "train") == want["train"]
    assert staged_tokens(folder, r.manifest, "val") == want["val"]
    assert cap <= r.tokens < cap + max(len(tok.encode(d)) + 1 for d in docs)
    assert r.documents < len(docs) - 1


# ---------------------------------------------------------------- resume after a kill


def test_resume_after_kill_file_store(tmp_path, data, docs):
    store = tmp_path / "store"
    args = ["--dataset", str(data), "--store", str(store), "--vocab-size", str(VOCAB)]
    args += ["--shard-tokens", str(SHARD), "--val-fraction", str(VAL), "--json"]
    killed = run_cli(args, {"LMCTL_FAULT": "stage.after_shard:3"})
    assert killed.returncode == -9, killed.stderr
    (folder,) = (store / "datasets").iterdir()
    assert not (folder / MANIFEST).exists()  # nothing marked complete
    assert sorted(snapshot(folder)) == [
        TOKENIZER,
        "train_00000_000000.bin",
        "train_00000_000001.bin",
        "train_00000_000002.bin",
    ]
    bad = folder / "train_00000_000001.bin"  # same size, other bytes: must be replaced, not trusted
    data_bytes = bytearray(bad.read_bytes())
    data_bytes[-1] ^= 1
    bad.write_bytes(bytes(data_bytes))
    done = snapshot(folder)

    finished = run_cli(args, {})
    assert finished.returncode == 0, finished.stderr
    r = json.loads(finished.stdout)
    assert sorted(r["skipped"]) == ["train_00000_000000.bin", "train_00000_000002.bin"]
    assert "train_00000_000001.bin" in r["uploaded"] and TOKENIZER not in r["uploaded"]
    after = snapshot(folder)
    kept = [TOKENIZER, "train_00000_000000.bin", "train_00000_000002.bin"]
    assert all(after[name] == done[name] for name in kept)  # the same files: not re-uploaded
    assert after[bad.name] != done[bad.name]
    m = Manifest.from_json((folder / MANIFEST).read_text())
    verify(folder, m, checksums=True)
    want = expected(docs, Tokenizer.load(folder / TOKENIZER))
    assert staged_tokens(folder, m, "train") == want["train"]
    assert staged_tokens(folder, m, "val") == want["val"]


# ---------------------------------------------------------------- loopback S3


def s3_objects(uri: str, endpoint: str, prefix: str) -> dict[str, bytes]:
    store = open_store(uri, endpoint)
    return {k.removeprefix(f"{prefix}/"): store.get_bytes(k) for k in store.list(prefix)}


def folder_objects(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def comparable(objects: dict[str, bytes]) -> dict[str, bytes]:
    """Every object byte for byte (the manifest included), stage.json without its timing."""
    out = dict(objects)
    info = json.loads(out.pop("stage.json"))
    info.pop("seconds")
    return out | {"stage.json": json.dumps(info).encode()}


def test_s3_stage_restage_and_resume(tmp_path, data, docs, s3_bucket, monkeypatch):
    args = ["--dataset", str(data), "--store", s3_bucket.uri, "--endpoint-url", s3_bucket.endpoint]
    args += ["--vocab-size", str(VOCAB), "--shard-tokens", str(SHARD), "--val-fraction", str(VAL), "--json"]
    killed = run_cli(args, {"LMCTL_FAULT": "stage.after_shard:2"})
    assert killed.returncode == -9, killed.stderr
    store = open_store(s3_bucket.uri, s3_bucket.endpoint)
    keys = store.list("datasets")
    prefix = keys[0].rsplit("/", 1)[0]
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == [
        TOKENIZER,
        "train_00000_000000.bin",
        "train_00000_000001.bin",
    ]

    puts: list[str] = []
    real_put = S3Store.put_file

    def spy(self, local, key, sha256=None):
        puts.append(key)
        return real_put(self, local, key, sha256)

    monkeypatch.setattr(S3Store, "put_file", spy)
    spec = DataConfig(dataset=str(data), shard_tokens=SHARD, val_fraction=VAL)
    r = stage(spec, s3_bucket.uri, vocab_size=VOCAB, endpoint_url=s3_bucket.endpoint)
    assert not r.reused and r.dataset_uri == f"{s3_bucket.uri}/{prefix}"
    assert sorted(r.skipped) == ["train_00000_000000.bin", "train_00000_000001.bin"]
    assert puts and not {f"{prefix}/{n}" for n in [TOKENIZER, *r.skipped]} & set(puts)
    assert all(store.size(f"{prefix}/{s.name}") == s.bytes for s in r.manifest.train + r.manifest.val)

    local = stage(spec, str(tmp_path / "ref"), vocab_size=VOCAB)  # the same staging to a file store
    assert local.content_hash == r.content_hash
    ref = folder_objects(local_dir(local))
    assert comparable(s3_objects(s3_bucket.uri, s3_bucket.endpoint, prefix)) == comparable(ref)

    puts.clear()
    again = stage(spec, s3_bucket.uri, vocab_size=VOCAB, endpoint_url=s3_bucket.endpoint)
    assert again.reused and puts == [] and again.manifest == r.manifest


def test_s3_through_faults_is_byte_identical(tmp_path, data, tok_path, s3_bucket):
    """503s and connection resets on a seeded fraction of requests: retried, and the result is the same."""
    spec = DataConfig(dataset=str(data), tokenizer=str(tok_path), shard_tokens=SHARD, val_fraction=VAL)
    ref = stage(spec, str(tmp_path / "ref"))
    with FaultProxy(s3_bucket.endpoint, seed=3, error_rate=0.12, reset_rate=0.06, cut_rate=0.1) as proxy:
        r = stage(spec, s3_bucket.uri, endpoint_url=proxy.endpoint)
    assert sum(proxy.faults.values()) > 0, proxy.faults
    assert r.content_hash == ref.content_hash
    got = s3_objects(s3_bucket.uri, s3_bucket.endpoint, f"datasets/{r.content_hash}")
    want = folder_objects(local_dir(ref))
    assert comparable(got) == comparable(want)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing staged


def cli_error(capsys, args: list[str]) -> str:
    code = main(["stage", *args])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def no_manifest(root: Path) -> bool:
    return not list(root.rglob(MANIFEST)) if root.exists() else True


def _fields(p):
    return write_jsonl(p / "c.jsonl", ["a", "b"], "content")


def _empty_texts(p):
    return write_jsonl(p / "e.jsonl", ["", ""])


def _empty_file(p):
    (p / "z.jsonl").write_text("")
    return p / "z.jsonl"


def _csv(p):
    (p / "t.csv").write_text("text\nhello\n")
    return p / "t.csv"


def _ok(p):
    return write_jsonl(p / "d.jsonl", ["hello"])


BAD = {
    "missing-path": (lambda p: p / "missing.jsonl", [], "dataset path .*missing.jsonl does not exist"),
    "missing-field": (_fields, [], "no field 'text'; fields found: id, content, meta"),
    "empty-texts": (_empty_texts, [], "has no text"),
    "empty-file": (_empty_file, [], "z.jsonl is empty: it has no rows"),
    "csv": (_csv, [], "t.csv is not a supported data file"),
    "tokenizer-path": (_ok, ["--tokenizer", "/nope/tok.json"], "--tokenizer: .*does not exist"),
    "vocab": (_ok, ["--vocab-size", "100"], "--vocab-size 100 is out of range"),
    "shard-tokens": (_ok, ["--shard-tokens", "10"], "--shard-tokens 10: must be greater than 1024"),
    "val-fraction": (_ok, ["--val-fraction", "0.7"], "--val-fraction 0.7"),
    "revision-local": (_ok, ["--revision", "v1"], "--revision applies to hub datasets"),
    "hub-unreachable": (lambda p: "someorg/somedataset", [], "is not a local file or folder"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(tmp_path, capsys, case):
    make, extra, match = BAD[case]
    store = tmp_path / "store"
    err = cli_error(capsys, ["--dataset", str(make(tmp_path)), "--store", str(store), *extra])
    assert re.search(match, err), err
    assert no_manifest(store)


def test_bad_store(tmp_path, capsys, data, s3_server, s3_env, s3_bucket, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    err = cli_error(capsys, ["--dataset", str(data), "--store", "s3://some-bucket/x", "--endpoint-url", dead])
    assert "cannot reach the S3 endpoint" in err
    missing = "s3://no-such-bucket-here/x"
    err = cli_error(capsys, ["--dataset", str(data), "--store", missing, "--endpoint-url", s3_server])
    assert "bucket 'no-such-bucket-here' does not exist" in err
    with iam_auth(s3_server, {"writer": ["s3:*"]}) as users:
        key, _ = users["writer"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        err = cli_error(
            capsys, ["--dataset", str(data), "--store", s3_bucket.uri, "--endpoint-url", s3_server]
        )
        assert "secret key" in err and "not-the-secret" not in err
    assert open_store(s3_bucket.uri, s3_bucket.endpoint).list() == []  # nothing written anywhere


def test_library_callers_get_a_value_error(tmp_path):
    """stage() raises StageError (a ValueError) for bad input, as config code does, and writes nothing."""
    with pytest.raises(ValueError, match="does not exist") as e:
        stage(dict(dataset=str(tmp_path / "nope.jsonl")), str(tmp_path / "store"))
    assert isinstance(e.value, StageError) and not (tmp_path / "store").exists()


def test_one_staging_per_hash_per_machine(tmp_path, data, tok_path, capfd):
    """A second staging of the same hash on this machine waits for the first, then reuses its commit."""
    import fcntl

    work = tmp_path / "work"
    store = str(tmp_path / "store")
    spec = DataConfig(dataset=str(data), tokenizer=str(tok_path), shard_tokens=SHARD)
    second: dict = {}
    with open(tmp_path / "work.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "the first staging" holds the lock
        waiter = threading.Thread(target=lambda: second.update(r=stage(spec, store, work_dir=work)))
        waiter.start()
        deadline = time.monotonic() + 60
        while "waiting for another staging" not in capfd.readouterr().err:
            assert waiter.is_alive() and time.monotonic() < deadline, "the second staging did not wait"
            time.sleep(0.05)
        assert no_manifest(tmp_path / "store")
        first = stage(spec, store, work_dir=tmp_path / "work-first")  # the first one commits meanwhile
        assert not first.reused
    waiter.join(timeout=60)
    assert second["r"].reused and second["r"].dataset_uri == first.dataset_uri  # one staged copy
    assert not work.exists()  # and it cleans up after itself


def test_cli_summary(tmp_path, capsys, data, tok_path):
    args = ["stage", "--dataset", str(data), "--tokenizer", str(tok_path), "--store", str(tmp_path / "s")]
    args += ["--shard-tokens", "4K", "--max-tokens", "1e4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "staged" in out and f"data.path=file://{tmp_path / 's'}/datasets/" in out
    assert main(args) == 0
    assert "reused: already staged" in capsys.readouterr().out


@pytest.mark.parametrize("machines", [1, 2])
def test_two_stagings_of_one_dataset_at_once_make_one_correct_copy(tmp_path, machines):
    """`lmctl stage` twice at the same instant into one store, from one machine (the second waits for the
    first and reuses its commit) or two (both upload the same bytes): one staged copy, every byte right."""
    import chaos

    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCTL_")}
    got = chaos.stage_twice_at_once(env, f"file://{tmp_path / 'store'}", machines, tmp_path)
    assert got["exit_codes"] == [0, 0] and got["one_copy"] and got["verified"], got
    if machines == 1:
        assert sorted(got["reused"]) == [False, True], got  # one staged it, the other reused it
