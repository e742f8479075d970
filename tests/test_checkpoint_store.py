"""Checkpoints in an object store: the same COMMIT protocol against loopback S3 (moto) and file://."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from model.checkpoint import COMMIT, Checkpointer, CheckpointError
from model.store import open_store

REPO = Path(__file__).resolve().parent.parent
RUN = "runs/r1/checkpoints"


@pytest.fixture(params=["s3", "file"])
def store_root(request, tmp_path):
    """(checkpoint root URI, endpoint URL or None): a fresh bucket on loopback S3, or a file:// store."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"{bucket.uri}/{RUN}", bucket.endpoint
    return f"file://{tmp_path}/store/{RUN}", None


def make(root: tuple[str, str | None], tmp_path: Path, **kw) -> Checkpointer:
    uri, endpoint = root
    return Checkpointer(uri, endpoint_url=endpoint, cache_dir=tmp_path / "cache", **kw)


def keys_of(root: tuple[str, str | None], step: int) -> list[str]:
    store = open_store(root[0], root[1])
    return [k.split("/", 1)[1] for k in store.list(f"step_{step:09d}")]


@pytest.mark.parametrize("async_save", [False, True])
def test_store_round_trip(store_root, tmp_path, async_save):
    c = make(store_root, tmp_path, async_save=async_save)
    assert c.load() is None and c.latest() is None
    w = torch.randn(300, 40)
    c.save(3, {"model": {"w": w, "tied": w}, "optim": {"m": torch.arange(5)}}, {"note": "x"})
    c.close()
    assert keys_of(store_root, 3) == [COMMIT, "meta.json", "model.pt", "optim.pt"]
    assert not list((tmp_path / "cache").rglob("*.pt"))  # uploaded files are not kept locally

    c2 = make(store_root, tmp_path / "other")  # a fresh machine: empty cache
    state, meta = c2.load()
    assert meta["step"] == 3 and meta["note"] == "x"
    assert torch.equal(state["model"]["w"], w) and torch.equal(state["optim"]["m"], torch.arange(5))
    assert state["model"]["w"].data_ptr() == state["model"]["tied"].data_ptr()
    state, _ = c2.load(keys=["optim"])  # served from the cache, which matched COMMIT
    assert list(state) == ["optim"]
    with pytest.raises(CheckpointError):
        c2.load(step=2)


def test_store_keep_last_k_and_clean_uncommitted(store_root, tmp_path):
    c = make(store_root, tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        c.save(step, {"model": {"w": torch.full((4,), float(step))}}, {})
    assert c.committed_steps() == [3, 4]
    store = open_store(*store_root)
    assert sorted({k.split("/")[0] for k in store.list()}) == ["step_000000003", "step_000000004"]

    for step in (2, 9):  # leftovers of crashed saves
        store.put_bytes(f"step_{step:09d}/model.pt", b"half")
    c.save(5, {"model": {"w": torch.zeros(4)}}, {})
    assert c.committed_steps() == [4, 5]
    assert keys_of(store_root, 2) == [] and keys_of(store_root, 3) == []
    assert keys_of(store_root, 9) == ["model.pt"]
    c.save(9, {"model": {"w": torch.ones(4)}}, {})
    assert keys_of(store_root, 9) == [COMMIT, "meta.json", "model.pt"]
    assert torch.equal(c.load()[0]["model"]["w"], torch.ones(4))


def _flip_byte(store, key):
    b = bytearray(store.get_bytes(key))
    b[len(b) // 2] ^= 0xFF
    store.put_bytes(key, bytes(b))


def _truncate(store, key):
    store.put_bytes(key, store.get_bytes(key)[:-100])


def _delete(store, key):
    store.delete(key)


@pytest.mark.parametrize("damage", [_flip_byte, _truncate, _delete])
def test_store_corrupt_newest_falls_back(store_root, tmp_path, caplog, damage):
    c = make(store_root, tmp_path)
    for step in (1, 2):
        c.save(step, {"model": {"w": torch.arange(1000.0) + step}}, {})
    assert c.load()[1]["step"] == 2  # step 2 is now in the local cache
    cached = next((tmp_path / "cache").rglob("step_000000002/model.pt"))
    cached.write_bytes(b"stale")  # a cached copy that no longer matches COMMIT is downloaded again
    assert c.load()[1]["step"] == 2 and cached.stat().st_size > 1000

    damage(open_store(*store_root), "step_000000002/model.pt")
    c = make(store_root, tmp_path / "fresh")  # another machine, whose cache cannot hide the damage
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        state, meta = c.load()
    assert meta["step"] == 1 and torch.equal(state["model"]["w"], torch.arange(1000.0) + 1)
    assert "step 2 is unusable" in caplog.text
    with pytest.raises(CheckpointError):
        c.load(step=2)


def test_store_fault_points_fire(store_root, tmp_path, monkeypatch):
    hits = []
    monkeypatch.setattr("model.checkpoint.fault_point", hits.append)
    c = make(store_root, tmp_path)
    c.save(1, {"a": {"x": torch.ones(2)}, "b": {"y": torch.ones(2)}}, {})
    assert hits == ["checkpoint.after_file", "checkpoint.before_commit"]


def test_a_commit_landing_between_a_readers_get_and_head_is_read_not_an_error(store_root, tmp_path):
    """A reader lists a step whose COMMIT is not there yet (404), and the writer's COMMIT lands before the
    reader asks whether it exists: the step is committed, not an error (it crashed a cloud run's status)."""
    c = make(store_root, tmp_path)
    c.save(3, {"model": {"w": torch.zeros(2)}}, {"step": 3})
    store = c._io.store
    key = f"step_{3:09d}/{COMMIT}"
    commit = store.get_bytes(key)
    store.delete(key)
    get = store.get_bytes

    def get_then_commit_lands(k: str) -> bytes:
        try:
            return get(k)
        finally:
            if k == key and not store.exists(k):
                store.put_bytes(k, commit)

    store.get_bytes = get_then_commit_lands
    assert c.committed_steps() == [3] and c.latest() == 3
