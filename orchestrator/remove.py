"""`lmctl rm`: remove a run for good, its folder here and its objects in the store, and nothing else.

Two things go: runs/<name>/ (a folder with a run.json) and the objects under runs/<name>/ in the run's
store (checkpoints, config.yaml, metrics.jsonl, STOP). Staged datasets (<store>/datasets/) are shared by
runs and stay. A run that is running, or whose processes are still alive, is refused. The store goes
first, the checkpoints' COMMIT markers before any other object, and the folder (with run.json) last: an
interrupted removal leaves no checkpoint that loads, and `lmctl rm` again finishes it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import ConfigError
from model.store import FileStore, Store, StoreError, open_store
from orchestrator import backends, runs


@dataclass
class Removal:
    """What removing a run takes away, measured before anything is touched."""

    name: str
    path: Path  # runs/<name>/
    store: str  # the run's store URI
    prefix: str  # the run's folder in the store
    objects: dict[str, int]  # key -> bytes, under `prefix`

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "folder": str(self.path),
            "store_prefix": f"{self.store}/{self.prefix}",
            "store_objects": len(self.objects),
            "store_bytes": sum(self.objects.values()),
        }


def plan_removal(name: str, root: Path | None = None) -> Removal:
    """What `lmctl rm <name>` would remove. ConfigError, with nothing touched, for a run that is running,
    a folder that is not plainly the run's own, or a store that cannot be listed."""
    path = runs.find_run(runs.runs_root(root), name)
    record = _removable(path)
    prefix = runs.store_prefix(record.name)
    return Removal(record.name, path, record.store, prefix, _listed(_open(record.store), prefix))


def remove(removal: Removal) -> None:
    """Remove the run's objects (COMMIT markers first) and folder, checking first that it still may go: it
    could have been resumed while the user read the question."""
    _removable(removal.path)
    store = _open(removal.store)
    keys = _listed(store, removal.prefix)  # anything written since the plan goes too
    try:
        for key in sorted(keys, key=lambda k: k.rsplit("/", 1)[-1] != "COMMIT"):
            store.delete(key)
        store.remove_empty(removal.prefix)
    except StoreError as e:
        raise ConfigError(f"removal stopped: {e}; lmctl rm {removal.name} again finishes it") from None
    shutil.rmtree(removal.path)


def _removable(path: Path) -> runs.RunRecord:
    """The run's record, if nothing of it runs and its folder holds only what is its own."""
    backend = backends.of(runs.read_record(path))
    try:
        record = backend.refresh(path)  # is it still running?
    except StoreError as e:
        raise ConfigError(f"cannot tell whether run {path.name!r} still runs, nothing removed: {e}") from None
    name, state = record.name, runs.effective_state(record)
    if state in runs.ACTIVE:
        raise ConfigError(f"run {name!r} is {state}: stop it first (lmctl stop {name}), then lmctl rm {name}")
    if backend.leftovers(record):
        raise ConfigError(
            f"run {name!r} still has processes running (its driver's leftovers): lmctl stop {name} reaps "
            f"them, then lmctl rm {name}"
        )
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link, not a run folder: remove it by hand")
    store = _open(record.store)
    if isinstance(store, FileStore) and store.root.resolve().is_relative_to(path.resolve()):
        raise ConfigError(
            f"run folder {path} holds the store {record.store}, which other runs may share: move the store "
            "out, or remove by hand"
        )
    return record


def _open(uri: str) -> Store:
    try:
        return open_store(uri)
    except StoreError as e:
        raise ConfigError(f"the run's store: {e}") from None


def _listed(store: Store, prefix: str) -> dict[str, int]:
    try:
        return store.list_sizes(prefix)
    except StoreError as e:
        raise ConfigError(f"cannot list the run's objects, nothing removed: {e}") from None
