"""Storage under faults (tests/chaos_storage.py, small sizes, fixed seeds): checkpoint uploads, metric pushes
and shard downloads succeed after retries or fail loudly leaving the previous state intact, against
loopback S3 through FaultProxy; a full local disk during a checkpoint write is handled the same way."""

from __future__ import annotations

import time

import pytest
from chaos_storage import (
    checkpoint_outage,
    checkpoint_uploads,
    disk_method,
    full_disk,
    metric_writes,
    retries,
    shard_downloads,
    small_dataset,
    small_parts,
    train_full_disk,
)
from s3 import FaultProxy

from model.store import StoreError, open_store


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("chaos-dataset"))


def healthy(r: dict) -> dict:
    """What every scenario promises, whatever the faults did."""
    assert r["violations"] == [], r
    assert r["previous_intact"], r
    assert r["ops"] == r["survived"] + r["failed_loudly"] > 0, r
    return r


# ---------------------------------------------------------------- the proxy's new faults, one at a time


@pytest.mark.parametrize("kind", ["abort", "torn", "stall"])
def test_every_attempt_faulted_fails_loudly_and_names_the_object(s3_bucket, tmp_path, kind):
    """Past the retries, an upload cut half-way, stored torn, or answered after the read timeout is a
    StoreError naming the object; a torn PUT in particular never passes for a written one."""
    local = tmp_path / "f.bin"
    local.write_bytes(bytes(range(256)) * 40)
    opts = {f"{kind}_rate": 1.0, "stall_s": 1.5}
    with retries(attempts=2, read_timeout=0.5), FaultProxy(s3_bucket.endpoint, seed=1, **opts) as proxy:
        store = open_store(s3_bucket.uri, proxy.endpoint)
        for put in (
            lambda: store.put_bytes("m/COMMIT", b'{"step": 1}'),
            lambda: store.put_file(local, "m/f"),
        ):
            with pytest.raises(StoreError) as e:
                put()
            assert "s3://" in str(e.value) and "\n" not in str(e.value)
            assert ("did not verify" if kind == "torn" else proxy.endpoint) in str(e.value)
    assert proxy.faults[kind] >= 4, proxy.faults
    clean = open_store(s3_bucket.uri, s3_bucket.endpoint)
    if kind == "abort":  # nothing reached the server
        assert clean.list("m") == []
    if kind == "stall":  # it did reach the server; only the replies came too late
        assert clean.get_bytes("m/COMMIT") == b'{"step": 1}'


def test_slow_replies_and_a_transient_tear_are_survived(s3_bucket, tmp_path):
    """A torn upload is caught (by the HEAD after it, or by S3 refusing a short part) and sent again: the
    second copy lands whole."""
    local, big = tmp_path / "f.bin", tmp_path / "big.bin"
    local.write_bytes(bytes(range(256)) * 40)
    big.write_bytes(bytes(range(256)) * (24 << 10))  # 6 MB: 2 parts of a multipart upload
    with FaultProxy(s3_bucket.endpoint, seed=2, slow_rate=0.5, slow_s=(0.05, 0.2)) as proxy:
        store = open_store(s3_bucket.uri, proxy.endpoint)
        proxy.then("torn")
        store.put_bytes("t/COMMIT", b'{"step": 2}')
        proxy.then("torn")
        store.put_file(local, "t/f.bin")
        assert proxy.faults["torn"] == 2 and proxy.requests["PUT"] == 4  # each sent twice
        proxy.then(None, "torn")  # the multipart upload's first part
        small_parts(store).put_file(big, "t/big.bin")
        assert proxy.faults["torn"] == 3 and proxy.faults["slow"] > 0, proxy.faults
    clean = open_store(s3_bucket.uri, s3_bucket.endpoint)
    assert clean.get_bytes("t/COMMIT") == b'{"step": 2}' and clean.get_bytes("t/f.bin") == local.read_bytes()
    assert clean.get_bytes("t/big.bin") == big.read_bytes()


def test_an_endpoint_that_goes_down_names_action_and_endpoint_and_comes_back(s3_bucket):
    with retries(attempts=2), FaultProxy(s3_bucket.endpoint) as proxy:
        store = open_store(s3_bucket.uri, proxy.endpoint)
        store.put_bytes("d/a", b"1")
        proxy.outage("down")
        with pytest.raises(
            StoreError, match=f"cannot reach the S3 endpoint {proxy.endpoint} \\(PUT of s3://"
        ):
            store.put_bytes("d/b", b"2")
        proxy.heal()
        store.put_bytes("d/b", b"2")
        assert store.get_bytes("d/b") == b"2"


# ---------------------------------------------------------------- the scenarios


def test_checkpoint_uploads_commit_whole_or_fail_loudly(s3_server, tmp_path):
    kinds = ("error", "reset", "cut", "slow", "abort", "torn")  # stalls: above and in shard_downloads
    r = healthy(checkpoint_uploads(s3_server, tmp_path, seed=1, trials=2, kinds=kinds))
    assert r["survived"] >= r["ops"] // 2, r  # moderate rates: retries absorb most faults
    assert sum(r["faults"].values()) > 0, r


def test_checkpoint_outage_keeps_previous_and_recovers(s3_server, tmp_path):
    r = healthy(checkpoint_outage(s3_server, tmp_path, seed=0, trials=3))
    assert r["failed_loudly"] == 3 and r["survived"] == 3 + 1, r  # each outage, each retry, the pruning one
    assert {"error", "reset", "down"} <= set(r["faults"]), r


def test_metric_pushes_match_or_fail_loudly(s3_server, tmp_path):
    r = healthy(metric_writes(s3_server, tmp_path, seed=0, trials=6))
    assert r["failed_loudly"] >= 1 and r["survived"] >= 6, r  # at least the outage's push failed


def test_shard_downloads_identical_or_loud_never_partial(s3_server, tmp_path, dataset):
    r = healthy(shard_downloads(s3_server, tmp_path, seed=0, trials=2, dataset=dataset))
    assert r["failed_loudly"] >= 1 and r["survived"] >= 2, r
    assert sum(r["faults"].values()) > 2, r


def test_full_disk_during_checkpoint_write(s3_server, tmp_path):
    start = time.monotonic()
    r = healthy(full_disk(s3_server, tmp_path, seed=0))
    assert r["failed_loudly"] == 6 and r["survived"] == 4, r  # 4 saves + 2 loads on a full disk; 4 after
    assert r["notes"].startswith("disk: "), r
    assert time.monotonic() - start < 60


def test_full_disk_fallback_without_tmpfs(s3_server, tmp_path):
    """Where no tmpfs can be mounted: RLIMIT_FSIZE makes the writes fail in the OS all the same."""
    if disk_method(tmp_path) == "rlimit":
        pytest.skip("the full-disk test above already ran under RLIMIT_FSIZE")
    r = healthy(full_disk(s3_server, tmp_path, seed=0, method="rlimit", async_modes=(False,)))
    assert r["failed_loudly"] == 3 and r["faults"] == {"efbig": 2}, r


def test_train_on_a_full_disk_prints_one_error_line(s3_server, tmp_path, dataset):
    r = healthy(train_full_disk(s3_server, tmp_path, seed=0, dataset=dataset, async_modes=(True,)))
    assert r["failed_loudly"] == 1, r  # the default, async checkpoints: the error surfaces a step later


def test_an_upload_altered_on_the_way_is_caught_by_what_the_server_computed(s3_bucket, tmp_path):
    """A body that lands with one byte changed has the right size and carries the sha256 metadata the
    client sent: only the server's ETag (MD5 of the body, or of its parts) tells. It is sent again and the
    second copy lands whole. A clean upload is verified by its HEAD alone, without reading it back."""
    local, big = tmp_path / "f.bin", tmp_path / "big.bin"
    local.write_bytes(bytes(range(256)) * 40)
    big.write_bytes(bytes(range(256)) * (24 << 10))  # 6 MB: 2 parts of a multipart upload
    with FaultProxy(s3_bucket.endpoint, seed=3) as proxy:
        store = open_store(s3_bucket.uri, proxy.endpoint)
        proxy.then("flip")
        store.put_bytes("x/COMMIT", b'{"step": 4, "files": {}}')
        proxy.then("flip")
        store.put_file(local, "x/f.bin")
        proxy.then(None, "flip")  # the multipart upload's first part
        small_parts(store).put_file(big, "x/big.bin")
        assert proxy.faults["flip"] == 3 and proxy.requests["PUT"] == 2 + 2 + 2 * 2, proxy.requests
        reads = proxy.requests["GET"]  # an ETag that does not match is read back once before the resend
        small_parts(store).put_file(big, "x/big2.bin")
        store.put_bytes("x/COMMIT2", b"{}")
        assert proxy.requests["GET"] == reads  # clean: the ETags matched, nothing was read back
    clean = open_store(s3_bucket.uri, s3_bucket.endpoint)
    assert clean.get_bytes("x/COMMIT") == b'{"step": 4, "files": {}}'
    assert clean.get_bytes("x/f.bin") == local.read_bytes()
    assert clean.get_bytes("x/big.bin") == big.read_bytes()


def test_every_attempt_altered_fails_loudly(s3_bucket, tmp_path):
    with FaultProxy(s3_bucket.endpoint, seed=4, flip_rate=1.0) as proxy:
        store = open_store(s3_bucket.uri, proxy.endpoint)
        with pytest.raises(StoreError, match="did not verify"):
            store.put_bytes("y/COMMIT", b'{"step": 5}')
    assert proxy.faults["flip"] == 2


def test_a_service_whose_etag_is_no_md5_is_verified_by_reading_back(s3_bucket, tmp_path, monkeypatch):
    """SSE-KMS objects, and some S3-compatible services, have ETags that are not the body's MD5: the
    object is then read back and hashed, so a whole one passes and an altered one is sent again."""

    def opaque_etags(store):
        head = store._head
        monkeypatch.setattr(store, "_head", lambda key: head(key) and {**head(key), "ETag": '"opaque-etag"'})
        return store

    store = opaque_etags(open_store(s3_bucket.uri, s3_bucket.endpoint))
    store.put_bytes("z/COMMIT", b'{"step": 6}')
    assert open_store(s3_bucket.uri, s3_bucket.endpoint).get_bytes("z/COMMIT") == b'{"step": 6}'
    with FaultProxy(s3_bucket.endpoint, seed=5) as proxy:
        flaky = opaque_etags(open_store(s3_bucket.uri, proxy.endpoint))
        proxy.then("flip")
        flaky.put_bytes("z/COMMIT2", b'{"step": 7}')
        assert proxy.faults["flip"] == 1 and proxy.requests["PUT"] == 2 and proxy.requests["GET"] == 2
    assert open_store(s3_bucket.uri, s3_bucket.endpoint).get_bytes("z/COMMIT2") == b'{"step": 7}'


def test_the_client_sends_no_default_checksums(s3_bucket):
    """botocore >= 1.36 sends CRC32 trailers by default, which R2, B2 and older MinIO refuse: off, for
    requests and responses alike (uploads are verified end to end instead)."""
    config = open_store(s3_bucket.uri, s3_bucket.endpoint).client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
