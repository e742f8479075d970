"""Workers read a staged dataset: fetched once per machine into a local cache, verified by its manifest.

A staged dataset lives at `<store>/datasets/<hash>/` (manifest.json, tokenizer.json, train_*.bin,
val_*.bin; see model/shards.py). `fetch_dataset` copies it to `<cache_dir>/<hash>/`: the manifest
and tokenizer first, then the val shards and the first train shard, and returns; the other train
shards keep downloading in a background thread pool. `TokenDataset(..., shard_ready=staged.wait)`
blocks only when it reaches a shard that is not there yet, so training starts after the first shard.

The cache is safe to share: every file lands by an atomic rename after its size and sha256 match the
manifest, so two workers fetching into one cache at once may both download a shard, but neither can
see, or leave behind, a partial or corrupt one. A shard already cached is re-hashed, not trusted.

Unlike model/shards.py's convention, the cache's manifest.json is written before its shards (so the
folder opens while they arrive); use `verify(local_dir, manifest)` or `wait()` before trusting it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from model.shards import (
    MANIFEST,
    TOKENIZER,
    Manifest,
    ShardInfo,
    atomic_write,
    file_sha256,
    read_manifest,
    verify,
)
from model.store import Store, StoreError, cache_root, open_store

if TYPE_CHECKING:
    from model.data import TokenDataset

FETCH_THREADS = 4  # shards in flight; each is itself a concurrent multipart transfer when large


def data_cache_dir() -> Path:
    """Where workers cache staged datasets: $LMCTL_CACHE/datasets, default ~/.cache/lmctl/datasets."""
    return cache_root() / "datasets"


def fetch_tokenizer(uri: str, cache_dir: Path, endpoint_url: str | None = None) -> Path:
    """Just the tokenizer.json of a staged dataset (for sampling and export), cached like the shards."""
    if "://" not in uri:
        return Path(uri) / TOKENIZER
    local = Path(cache_dir) / uri.rstrip("/").rsplit("/", 1)[-1] / TOKENIZER
    if not local.exists():
        open_store(uri, endpoint_url).get_file(TOKENIZER, local)
    return local


class StagedDataset:
    """A dataset in a local folder that `model.data.TokenDataset` opens, possibly still arriving."""

    def __init__(
        self, uri: str, local_dir: Path, manifest: Manifest, pending: dict[str, Future] | None = None
    ):
        self.uri, self.local_dir, self.manifest = uri, Path(local_dir), manifest
        self._pending = pending or {}

    def wait(self, name: str | None = None) -> None:
        """Block until shard `name` (every shard when None) is in place; re-raises its download error."""
        futures = self._pending.values() if name is None else [self._pending.get(name)]
        for future in futures:
            if future is not None:
                future.result()

    @property
    def downloaded(self) -> list[str]:
        """Shards this fetch downloaded so far (those found verified in the cache are not listed)."""
        return sorted(n for n, f in self._pending.items() if f.done() and not f.exception() and f.result())

    def dataset(self, split: Literal["train", "val"], seq_len: int) -> TokenDataset:
        from model.data import TokenDataset

        return TokenDataset(self.local_dir, split, seq_len, shard_ready=self.wait)


def fetch_dataset(
    uri: str, cache_dir: Path, wait_all: bool = False, endpoint_url: str | None = None
) -> StagedDataset:
    """Fetch the staged dataset at store URI `uri` into `cache_dir/<hash>/`; a local folder is used as is.

    Returns once the manifest, tokenizer, val shards and first train shard are in place (all
    shards with `wait_all`). Raises StoreError naming what is missing, unreachable or corrupt.
    """
    if "://" not in uri:  # a local folder: nothing to fetch, just check it is complete
        try:
            manifest = read_manifest(uri)
            verify(uri, manifest)
        except ValueError as e:
            raise StoreError(str(e)) from None
        return StagedDataset(uri, Path(uri), manifest)

    store = open_store(uri, endpoint_url)
    local_dir = Path(cache_dir) / uri.rstrip("/").rsplit("/", 1)[-1]
    local_dir.mkdir(parents=True, exist_ok=True)
    manifest = _fetch_manifest(store, local_dir)
    _fetch_tokenizer(store, local_dir, manifest.tokenizer_sha256)

    order = [*manifest.val, *manifest.train]  # val and the first train shard are what training needs first
    first = {info.name for info in [*manifest.val, *manifest.train[:1]]}
    pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="lmctl-fetch")
    pending = {info.name: pool.submit(_fetch_shard, store, local_dir, info) for info in order}
    pool.shutdown(wait=False)  # the queued shards still run; the threads exit when done
    staged = StagedDataset(uri, local_dir, manifest, pending)
    try:
        for name in pending if wait_all else first:
            staged.wait(name)
    except BaseException:
        for future in pending.values():
            future.cancel()
        raise
    return staged


def staged_manifest(uri: str, endpoint_url: str | None = None) -> Manifest:
    """The manifest of the staged dataset at `uri`, read where it lives (one GET from a store): the cheap
    "is this dataset staged?" check, before anything is written or downloaded."""
    if "://" not in uri:
        try:
            return read_manifest(uri)
        except ValueError as e:
            raise StoreError(str(e)) from None
    store = open_store(uri, endpoint_url)
    return _parse_manifest(store, store.get_bytes(MANIFEST))


def _parse_manifest(store: Store, raw: bytes) -> Manifest:
    try:
        manifest = Manifest.from_json(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{store.url(MANIFEST)}: {e}") from None
    bad = [s.name for s in manifest.train + manifest.val if "/" in s.name or s.name.startswith(".")]
    if bad:
        raise StoreError(f"{store.url(MANIFEST)} lists shard names that are not plain file names: {bad[:3]}")
    return manifest


def _fetch_manifest(store: Store, local_dir: Path) -> Manifest:
    raw = store.get_bytes(MANIFEST)
    manifest = _parse_manifest(store, raw)
    path = local_dir / MANIFEST
    if not path.is_file() or path.read_bytes() != raw:
        atomic_write(path, [raw])
    return manifest


def _fetch_tokenizer(store: Store, local_dir: Path, expected: str) -> None:
    """The manifest records the tokenizer's canonical hash (not the file's), so check it by loading."""
    from model.tokenizer import Tokenizer

    path = local_dir / TOKENIZER

    def matches() -> bool:
        try:
            return Tokenizer.load(path).sha256 == expected
        except (OSError, ValueError):
            return False

    if path.is_file() and matches():
        return
    store.get_file(TOKENIZER, path)
    if not matches():
        path.unlink(missing_ok=True)
        raise StoreError(
            f"{store.url(TOKENIZER)} is not the tokenizer the manifest names (sha256 {expected[:12]}...)"
        )


def _fetch_shard(store: Store, local_dir: Path, info: ShardInfo) -> bool:
    """Make sure one shard is cached and verified; True when it had to be downloaded."""
    path = local_dir / info.name
    if path.is_file() and path.stat().st_size == info.bytes and file_sha256(path) == info.sha256:
        return False
    store.get_file(info.name, path, sha256=info.sha256)
    return True
