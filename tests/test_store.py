"""The object store: the same behaviour from a plain directory and from a real S3 server on loopback."""

import hashlib
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from boto3.s3.transfer import TransferConfig
from s3 import FaultProxy, iam_auth, s3_client

from model.store import FileStore, S3Store, StoreError, open_store

MB = 1 << 20
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB, max_concurrency=4)


def small_parts(store):
    """Multipart from 5 MB (S3's minimum part size), so a 12 MB file goes up and down in 3 parts."""
    if isinstance(store, S3Store):
        store.transfer = SMALL_PARTS
    return store


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    return small_parts(open_store(bucket.uri, bucket.endpoint))


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.bin"
    path.write_bytes(np.random.default_rng(0).bytes(12 * MB + 12345))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def behind_back(store, key: str, data: bytes, keep_sha_of: bytes | None = None) -> None:
    """Overwrite an object without the store: bit rot, another writer, a broken tool."""
    if isinstance(store, FileStore):
        (store.root / key).write_bytes(data)
        return
    meta = {"sha256": hashlib.sha256(keep_sha_of).hexdigest()} if keep_sha_of else {}
    s3_client(store.endpoint).put_object(Bucket=store.bucket, Key=store._key(key), Body=data, Metadata=meta)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- both backends


def test_file_round_trip_small_and_multipart(store, big_file, tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"tokens" * 1000)
    store.put_file(small, "datasets/h/small.bin")
    store.put_file(big_file, "datasets/h/big.bin", sha256=sha(big_file))
    out = tmp_path / "out"
    store.get_file("datasets/h/small.bin", out / "small.bin")
    store.get_file("datasets/h/big.bin", out / "big.bin", sha256=sha(big_file))
    assert (out / "small.bin").read_bytes() == small.read_bytes()
    assert (out / "big.bin").read_bytes() == big_file.read_bytes()
    assert leftovers(out) == ["big.bin", "small.bin"]  # no tmp files left behind
    assert store.size("datasets/h/big.bin") == big_file.stat().st_size
    assert store.stored_sha256("datasets/h/big.bin") == sha(big_file)
    assert store.stored_sha256("datasets/h/none.bin") is None
    if isinstance(store, S3Store):  # it really was a multipart upload: the ETag of one is "<md5>-<parts>"
        head = store.client.head_object(Bucket=store.bucket, Key=store._key("datasets/h/big.bin"))
        assert head["ETag"].strip('"').endswith("-3")
        assert head["Metadata"]["sha256"] == sha(big_file)


def test_bytes_list_exists_size_delete(store):
    assert store.list() == [] and not store.exists("runs/a/COMMIT") and store.size("runs/a/COMMIT") is None
    store.put_bytes("runs/a/COMMIT", b"{}")
    store.put_bytes("runs/a/step_1/model.pt", b"x" * 10)
    store.put_bytes("runs/ab/COMMIT", b"")
    store.put_bytes("datasets/h/manifest.json", b'{"v": 1}')
    assert store.get_bytes("datasets/h/manifest.json") == b'{"v": 1}'
    assert store.get_bytes("runs/ab/COMMIT") == b""
    assert store.stored_sha256("runs/ab/COMMIT") == hashlib.sha256(b"").hexdigest()
    assert store.exists("runs/a/COMMIT") and store.size("runs/a/step_1/model.pt") == 10
    assert store.list() == [
        "datasets/h/manifest.json",
        "runs/a/COMMIT",
        "runs/a/step_1/model.pt",
        "runs/ab/COMMIT",
    ]
    assert store.list("runs/a") == store.list("runs/a/") == ["runs/a/COMMIT", "runs/a/step_1/model.pt"]
    assert store.list("nothing/here") == []
    store.delete("runs/a/COMMIT")
    store.delete("runs/a/COMMIT")  # deleting a missing key is fine, as on S3
    assert not store.exists("runs/a/COMMIT") and store.list("runs/a") == ["runs/a/step_1/model.pt"]
    assert store.url("runs/a/COMMIT") == f"{store.uri}/runs/a/COMMIT"
    store.check()


def test_missing_key(store, tmp_path):
    for call in (lambda: store.get_bytes("no/such"), lambda: store.get_file("no/such", tmp_path / "x")):
        with pytest.raises(StoreError, match="does not exist") as e:
            call()
        assert store.url("no/such") in str(e.value)
    assert leftovers(tmp_path) == []


def test_corrupt_object_never_lands(store, tmp_path):
    good = tmp_path / "shard.bin"
    good.write_bytes(b"a" * 4096)
    store.put_file(good, "d/shard.bin")
    (tmp_path / "out").mkdir()
    dest = tmp_path / "out" / "shard.bin"
    behind_back(store, "d/shard.bin", b"b" * 4096, keep_sha_of=b"a" * 4096)  # same size, other bytes
    with pytest.raises(StoreError, match="corrupt"):
        store.get_file("d/shard.bin", dest, sha256=sha(good))
    if isinstance(store, S3Store):  # the object's own sha256 metadata catches it without being told
        with pytest.raises(StoreError, match="corrupt"):
            store.get_file("d/shard.bin", dest)
    behind_back(store, "d/shard.bin", b"a" * 100)  # truncated
    with pytest.raises(StoreError):
        store.get_file("d/shard.bin", dest, sha256=sha(good))
    assert leftovers(tmp_path / "out") == []  # neither a partial file at dest nor a tmp file


def test_put_file_refuses_a_local_file_that_does_not_match(store, tmp_path):
    local = tmp_path / "f.bin"
    local.write_bytes(b"changed after hashing")
    with pytest.raises(StoreError, match=r"sha256|corrupt"):
        store.put_file(local, "d/f.bin", sha256="0" * 64)
    assert not store.exists("d/f.bin")
    with pytest.raises(StoreError, match="does not exist"):
        store.put_file(tmp_path / "nope.bin", "d/nope.bin")


@pytest.mark.parametrize(
    "key", ["", "../x", "a/../b", "/abs", "a//b", "a/", "./a", "a\0b"], ids=lambda k: repr(k)
)
def test_bad_keys(store, key, tmp_path):
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_file(key, tmp_path / "x"),
        lambda: store.exists(key),
    ):
        with pytest.raises(StoreError, match="relative name"):
            call()


# ---------------------------------------------------------------- URIs


def test_open_store_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_store(f"file://{tmp_path}/s").root == open_store(str(tmp_path / "s")).root == tmp_path / "s"
    assert open_store("rel/dir").root == tmp_path / "rel" / "dir"  # a plain path is resolved
    s3 = open_store("s3://my-bucket/runs/x/", endpoint_url="http://127.0.0.1:9")
    assert (s3.bucket, s3.prefix, s3.uri) == ("my-bucket", "runs/x", "s3://my-bucket/runs/x")
    assert s3._client is None  # opening a store makes no client and no request
    assert open_store("s3://my-bucket").url("a/b") == "s3://my-bucket/a/b"


@pytest.mark.parametrize(
    "uri, match",
    [
        ("gs://bucket/x", "unsupported store URI"),
        ("ftp://host/x", "unsupported store URI"),
        ("", "invalid store URI"),
        ("s3://Bad_Bucket/x", "invalid bucket name"),
        ("s3:///x", "invalid bucket name"),
        ("s3://bucket/../etc", "relative name"),
        ("s3://bucket/a//b", "relative name"),
        ("file://relative/dir", "absolute path"),
        ("file:///data/../etc", "relative name"),
        ("\x08", "control characters"),  # a plain folder: its file:// URI is printed and reopened
        ("runs/a\x1bb", "control characters"),
    ],
)
def test_bad_uris(uri, match):
    with pytest.raises(StoreError, match=match) as e:
        open_store(uri)
    assert "\n" not in str(e.value)


def test_file_store_check(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(StoreError, match="not a directory"):
        open_store(str(tmp_path / "f")).check()
    open_store(str(tmp_path / "new" / "root")).check()  # creatable is fine


# ---------------------------------------------------------------- S3: faults and errors


def test_s3_survives_faults(s3_bucket, big_file, tmp_path):
    """503s, connection resets and bodies cut half-way: botocore and s3transfer retry them all."""
    with FaultProxy(s3_bucket.endpoint, seed=7, error_rate=0.1, reset_rate=0.05, cut_rate=0.1) as proxy:
        store = small_parts(open_store(s3_bucket.uri, proxy.endpoint))
        for i in range(3):
            store.put_file(big_file, f"d/big{i}.bin")
            store.get_file(f"d/big{i}.bin", tmp_path / f"big{i}.bin")
            assert (tmp_path / f"big{i}.bin").read_bytes() == big_file.read_bytes()
        for i in range(10):
            store.put_bytes(f"m/{i}.json", b"%d" % i * 1000)
        assert [store.get_bytes(f"m/{i}.json") for i in range(10)] == [b"%d" % i * 1000 for i in range(10)]
        assert len(store.list("m")) == 10
    assert sum(proxy.requests.values()) > 50
    assert proxy.faults["error"] > 0 and proxy.faults["reset"] > 0 and proxy.faults["cut"] > 0, proxy.faults


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_endpoint_fails_fast(s3_env):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach the S3 endpoint {endpoint}") as e:
        open_store("s3://bucket/x", endpoint).check()
    assert time.monotonic() - start < 15
    assert "AWS_ENDPOINT_URL_S3" in str(e.value) and "\n" not in str(e.value)


def test_s3_malformed_endpoint(s3_env):
    with pytest.raises(StoreError, match="invalid S3 endpoint"):
        open_store("s3://bucket/x", "localhost:9000").exists("k")


def test_s3_missing_bucket(s3_server, s3_env, tmp_path):
    store = open_store("s3://no-such-bucket-here/x", s3_server)
    for call in (store.check, lambda: store.get_file("k", tmp_path / "k"), lambda: store.put_bytes("k", b"")):
        with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
            call()


def test_s3_no_credentials(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"):
        open_store(s3_bucket.uri, s3_bucket.endpoint).check()


def test_s3_credentials_checked_by_the_server(s3_bucket, monkeypatch):
    """moto with IAM auth on: it verifies signatures and policies as AWS does."""
    with iam_auth(s3_bucket.endpoint, {"writer": ["s3:*"], "nobody": []}) as users:
        writer_key, writer_secret = users["writer"]
        cases = [
            (("AKIAUNKNOWNKEY000000", "whatever-secret"), "does not know the access key id"),
            ((writer_key, "not-the-secret"), "wrong secret key"),
            (users["nobody"], "access denied"),
        ]
        for (key, secret), match in cases:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            store = open_store(s3_bucket.uri, s3_bucket.endpoint)
            with pytest.raises(StoreError, match=match) as e:
                store.check()
            assert secret not in str(e.value) and "\n" not in str(e.value)
            with pytest.raises(StoreError, match=match):
                store.put_bytes("x", b"x")
            with pytest.raises(StoreError, match="access denied"):  # a HEAD's 403 carries no error code
                store.exists("x")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", writer_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", writer_secret)
        store = open_store(s3_bucket.uri, s3_bucket.endpoint)
        store.check()
        store.put_bytes("ok", b"ok")
        assert store.get_bytes("ok") == b"ok"
