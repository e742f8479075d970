"""Workers fetch a staged dataset from a store into a local cache and read the same tokens as the original."""

import threading
from pathlib import Path

import numpy as np
import pytest
from s3 import FaultProxy

import model.staged
from model.data import TokenDataset
from model.shards import MANIFEST, file_sha256, verify
from model.staged import fetch_dataset
from model.store import FileStore, StoreError, open_store

SEQ = 64
HASH = "0123abcd"


def upload(store, src: Path, prefix: str) -> None:
    """What staging leaves in a store: every file, the manifest last."""
    for path in sorted(src.iterdir()):
        if path.name != MANIFEST:
            store.put_file(path, f"{prefix}/{path.name}")
    store.put_bytes(f"{prefix}/{MANIFEST}", (src / MANIFEST).read_bytes())


@pytest.fixture(params=["file", "s3"])
def remote(request, tiny_dataset, tmp_path):
    """(dataset URI, endpoint or None, store) with the shared tiny dataset staged under datasets/<hash>."""
    if request.param == "file":
        store, endpoint = open_store(str(tmp_path / "store")), None
    else:
        bucket = request.getfixturevalue("s3_bucket")
        store, endpoint = open_store(bucket.uri, bucket.endpoint), bucket.endpoint
    upload(store, tiny_dataset[0], f"datasets/{HASH}")
    return f"{store.uri}/datasets/{HASH}", endpoint, store


def assert_same_tokens(staged, original: Path) -> None:
    for split in ("train", "val"):
        ours, theirs = staged.dataset(split, SEQ), TokenDataset(original, split, SEQ)
        ids = np.arange(theirs.n_sequences)
        np.testing.assert_array_equal(ours.sequences(ids), theirs.sequences(ids))


def shard_names(manifest) -> list[str]:
    return sorted(s.name for s in manifest.train + manifest.val)


def test_fetch_reads_identical_tokens(remote, tiny_dataset, tmp_path):
    uri, endpoint, _ = remote
    src, manifest = tiny_dataset
    assert len(manifest.train) >= 3, "the fixture should span several train shards"
    staged = fetch_dataset(uri, tmp_path / "cache", endpoint_url=endpoint)
    assert staged.local_dir == tmp_path / "cache" / HASH
    assert_same_tokens(staged, src)
    staged.wait()
    verify(staged.local_dir, manifest, checksums=True)
    assert staged.downloaded == shard_names(manifest)
    assert sorted(p.name for p in staged.local_dir.iterdir()) == sorted(p.name for p in src.iterdir())
    assert (staged.local_dir / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_second_fetch_downloads_nothing_and_repairs_the_cache(remote, tiny_dataset, tmp_path):
    uri, endpoint, _ = remote
    src, manifest = tiny_dataset
    cache = tmp_path / "cache"
    fetch_dataset(uri, cache, wait_all=True, endpoint_url=endpoint)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (cache / HASH).iterdir()}
    if endpoint:  # count the requests: only the manifest is read again
        with FaultProxy(endpoint) as proxy:
            again = fetch_dataset(uri, cache, wait_all=True, endpoint_url=proxy.endpoint)
        assert proxy.requests["GET"] == 1 and set(proxy.requests) <= {"GET", "HEAD"}, proxy.requests
    else:
        again = fetch_dataset(uri, cache, wait_all=True)
    assert again.downloaded == []
    assert {p.name: p.stat().st_mtime_ns for p in (cache / HASH).iterdir()} == mtimes

    shard = cache / HASH / manifest.train[1].name
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # bit rot: same size, other bytes
    shard.write_bytes(bytes(data))
    (cache / HASH / manifest.val[0].name).unlink()
    repaired = fetch_dataset(uri, cache, wait_all=True, endpoint_url=endpoint)
    assert repaired.downloaded == sorted([manifest.train[1].name, manifest.val[0].name])
    assert shard.read_bytes() == (src / shard.name).read_bytes()
    assert_same_tokens(repaired, src)


def test_training_starts_after_the_first_shard(tiny_dataset, tmp_path, monkeypatch, request):
    """fetch_dataset returns before the later train shards arrive; TokenDataset waits for them on use."""
    src, manifest = tiny_dataset
    gate, fetched = threading.Event(), []
    request.addfinalizer(gate.set)  # never leave fetch threads waiting, even if an assert fails

    class GatedStore(FileStore):
        def get_file(self, key, local, sha256=None):
            if key.startswith("train_") and key != manifest.train[0].name:
                gate.wait(timeout=60)
            fetched.append(key)
            super().get_file(key, local, sha256)

    store = GatedStore(tmp_path / "store")
    upload(store, src, f"datasets/{HASH}")
    monkeypatch.setattr(model.staged, "open_store", lambda uri, endpoint_url=None: GatedStore(Path(uri[7:])))
    staged = fetch_dataset(f"{store.uri}/datasets/{HASH}", tmp_path / "cache")
    last = manifest.train[-1].name
    assert not (staged.local_dir / last).exists()  # still held back at the gate
    assert {manifest.train[0].name, *(s.name for s in manifest.val)} <= set(fetched)

    ours, theirs = staged.dataset("train", SEQ), TokenDataset(src, "train", SEQ)
    np.testing.assert_array_equal(ours.sequence(0), theirs.sequence(0))  # the first shard is enough
    asked = []
    ours.shard_ready = lambda name: (asked.append(name), gate.set(), staged.wait(name))
    np.testing.assert_array_equal(ours.sequence(len(ours) - 1), theirs.sequence(len(theirs) - 1))
    assert asked == [last] and (staged.local_dir / last).exists()


def test_concurrent_fetches_share_one_cache(remote, tiny_dataset, tmp_path):
    """Two workers on one machine fetch into the same cache at once: both succeed, nothing is corrupt."""
    uri, endpoint, _ = remote
    src, manifest = tiny_dataset
    results, errors = [], []

    def worker():
        try:
            results.append(fetch_dataset(uri, tmp_path / "cache", wait_all=True, endpoint_url=endpoint))
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2
    verify(tmp_path / "cache" / HASH, manifest, checksums=True)
    assert not [p for p in (tmp_path / "cache" / HASH).iterdir() if p.name.startswith(".")]  # no tmp files
    for staged in results:
        assert_same_tokens(staged, src)


def test_fetch_through_faults(s3_bucket, tiny_dataset, tmp_path):
    src, manifest = tiny_dataset
    store = open_store(s3_bucket.uri, s3_bucket.endpoint)
    upload(store, src, f"datasets/{HASH}")
    with FaultProxy(s3_bucket.endpoint, seed=3, error_rate=0.1, reset_rate=0.05, cut_rate=0.05) as proxy:
        staged = fetch_dataset(f"{store.uri}/datasets/{HASH}", tmp_path / "cache", True, proxy.endpoint)
    assert sum(proxy.faults.values()) > 0, proxy.faults
    for info in manifest.train + manifest.val:
        assert file_sha256(staged.local_dir / info.name) == info.sha256
    assert_same_tokens(staged, src)


def test_local_folder_is_used_as_is(tiny_dataset, tmp_path):
    src, _ = tiny_dataset
    staged = fetch_dataset(str(src), tmp_path / "cache")
    assert staged.local_dir == src and not (tmp_path / "cache").exists()
    assert_same_tokens(staged, src)
    with pytest.raises(StoreError, match="no manifest.json"):
        fetch_dataset(str(tmp_path), tmp_path / "cache")


def test_fetch_errors(remote, tiny_dataset, tmp_path):
    uri, endpoint, store = remote
    _, manifest = tiny_dataset
    with pytest.raises(StoreError, match="manifest.json does not exist"):
        fetch_dataset(uri.replace(HASH, "nohash"), tmp_path / "cache", endpoint_url=endpoint)
    bad = manifest.train[-1].name
    store.put_bytes(f"datasets/{HASH}/{bad}", b"\0" * manifest.train[-1].bytes)  # same size, wrong bytes
    with pytest.raises(StoreError, match="corrupt"):
        fetch_dataset(uri, tmp_path / "cache", wait_all=True, endpoint_url=endpoint)
    assert not (tmp_path / "cache" / HASH / bad).exists()
