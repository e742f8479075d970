"""Atomic, optionally asynchronous checkpoints: data files first, a COMMIT marker last.

Layout of one checkpoint:

    root/step_{step:09d}/<key>.pt    one torch.save file per top-level key of the state
                         meta.json   the caller's meta + step + time
                         COMMIT      JSON {"step", "time", "files": {name: {"size", "crc32"}}}, written last

A reader trusts a step only when its COMMIT parses and every file matches it, so a SIGKILL at any
instant leaves the previous checkpoint usable. Pruning removes COMMIT first (durably), then the rest of
the step's folder: a crash in between leaves an uncommitted folder, never listed as loadable, that the
next prune removes. Nothing relies on renaming a directory: an object store (s3://) cannot do that
atomically, but it can PUT a small COMMIT object atomically, so the same protocol holds there: with a
store URI as root (s3://bucket/runs/r1/checkpoints, file:///...), each file is serialised to a local temp
file exactly as for a folder, uploaded (verified), then deleted; COMMIT is one PUT. Loading downloads the
chosen step into a local cache and verifies it against COMMIT there.

torch and numpy are imported where tensors are handled: listing a run's checkpoints (`lmctl status`,
`lmctl checkpoints`) reads COMMIT markers only and must stay instant.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from model.faults import fault_point
from model.shards import atomic_write, fsync_dir
from model.store import Store, StoreError, cache_root, open_store, os_error_text

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

COMMIT = "COMMIT"
META = "meta.json"
_STEP_DIR = re.compile(r"step_(\d+)")
_KEY = re.compile(r"[A-Za-z0-9_\-]+")
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match its COMMIT marker."""


# ---------------------------------------------------------------- storage
# The only code that touches files: these functions and the adapters below (_Folder, _StoreFolder).
# The protocol above them speaks in step folders, names, streams and bytes. crc32: zlib runs ~4 GB/s
# here, sha256 ~1.9 GB/s; we need to catch torn and truncated files, not adversaries.


class _CrcWriter:
    """File-like wrapper that checksums what passes through, so writing a file also measures it."""

    def __init__(self, f: BinaryIO):
        self.f, self.crc, self.size = f, 0, 0
        self.error: OSError | None = None  # torch.save turns a failed write into an opaque RuntimeError

    def write(self, b) -> int:
        self.crc = zlib.crc32(b, self.crc)
        self.size += memoryview(b).nbytes
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_stream(path: Path, fill: Callable[[BinaryIO], Any]) -> dict[str, int]:
    """Write a new file through fill(f), fsync it, check its size on disk; return {"size", "crc32"}.

    A write that fails (a full disk, a file size limit, an I/O error) removes the partial file and raises
    CheckpointError naming the file and the errno, whatever torch.save made of the error on its way out.
    """
    path.unlink(missing_ok=True)  # a new inode: a loaded checkpoint may still be mmap-ed from the old one
    w = None
    try:
        with open(path, "wb") as f:
            w = _CrcWriter(f)
            fill(w)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # a partial file must not keep a full disk full
        cause = w.error if w is not None and w.error is not None else e
        if isinstance(cause, OSError):
            raise CheckpointError(f"cannot write {path}: {os_error_text(cause)}") from e
        raise
    size = path.stat().st_size
    if size != w.size:
        raise CheckpointError(f"{path}: wrote {w.size} bytes but {size} are on disk")
    return {"size": size, "crc32": w.crc}


def _measure(path: Path) -> dict[str, int]:
    """{"size", "crc32"} of a file as it is now (streamed: multi-GB files must not be read into memory)."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": crc}


def _list(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir())
    except FileNotFoundError:
        return []


class _Folder:
    """Checkpoints in a local folder: `root/<step dir>/<name>`. The Checkpointer speaks only to this
    interface (or _StoreFolder's), so the COMMIT protocol, pruning and verification exist once."""

    def __init__(self, root: Path):
        self.root = root  # created by the first save: listing a run that saved nothing creates nothing

    def where(self, d: str) -> Path:
        return self.root / d

    def dirs(self) -> list[str]:
        return _list(self.root)

    def names(self, d: str) -> list[str]:
        return _list(self.root / d)

    def begin(self, d: str) -> None:
        (self.root / d).mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)

    def write(self, d: str, name: str, fill: Callable[[BinaryIO], Any]) -> dict[str, int]:
        return _write_stream(self.root / d / name, fill)

    def commit(self, d: str, data: bytes) -> None:
        fsync_dir(self.root / d)  # the data files' names are durable before COMMIT can be
        fault_point("checkpoint.before_commit")
        # tmp + fsync + rename + fsync dir: readers see no COMMIT or the whole one, never a torn one
        atomic_write(self.root / d / COMMIT, [data])

    def read_bytes(self, d: str, name: str) -> bytes:
        return (self.root / d / name).read_bytes()

    def local(self, d: str, name: str, expected: Any) -> Path:
        """A local path to verify and load `name` from: the file itself."""
        return self.root / d / name

    def delete(self, d: str, name: str) -> None:
        """Durably: once COMMIT's removal returns, a power cut cannot bring it back over deleted files."""
        (self.root / d / name).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(self.root / d)

    def remove(self, d: str) -> None:
        """The step's folder and whatever is left in it (its COMMIT is gone)."""
        shutil.rmtree(self.root / d, ignore_errors=True)  # what fails stays listed: the next prune retries

    def abandon(self, d: str) -> None:
        """After a failed save: drop the step's files now (a full disk gets its space back), unless its
        COMMIT made it (then the step is whole, and only something after the rename failed)."""
        if COMMIT not in self.names(d):
            self.remove(d)


class _StoreFolder:
    """Checkpoints in an object store under a URI: keys `<step dir>/<name>`.

    Files are serialised to a local temp file (same _write_stream, same crc32), uploaded with put_file
    (which re-checks size and sha256 in the store), then deleted, so local disk holds one file at a
    time. Loading downloads into `cache/<hash of uri>/<step dir>/` and torch.load memory-maps from
    there; a cached copy that already matches COMMIT is not downloaded again.
    """

    def __init__(self, store: Store, cache: Path):
        self.store = store
        self.cache = cache / hashlib.sha256(store.uri.encode()).hexdigest()[:16]

    def where(self, d: str) -> str:
        return self.store.url(d)

    def dirs(self) -> list[str]:
        return sorted({k.split("/", 1)[0] for k in self.store.list() if "/" in k})

    def names(self, d: str) -> list[str]:
        return [k.split("/", 1)[1] for k in self.store.list(d)]

    def begin(self, d: str) -> None:
        pass  # object stores have no directories

    def write(self, d: str, name: str, fill: Callable[[BinaryIO], Any]) -> dict[str, int]:
        self.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache, prefix="upload-") as tmp:
            path = Path(tmp) / name
            try:
                stat = _write_stream(path, fill)
            except CheckpointError as e:
                raise CheckpointError(f"{e}: the local copy of {self.store.url(f'{d}/{name}')}") from e
            self.store.put_file(path, f"{d}/{name}")
        return stat

    def commit(self, d: str, data: bytes) -> None:
        fault_point("checkpoint.before_commit")
        self.store.put_bytes(f"{d}/{COMMIT}", data)  # one PUT: visible whole or not at all

    def read_bytes(self, d: str, name: str) -> bytes:
        try:
            return self.store.get_bytes(f"{d}/{name}")
        except StoreError:
            if not self.store.exists(f"{d}/{name}"):
                raise FileNotFoundError(self.store.url(f"{d}/{name}")) from None
        # There now: written since the GET (a COMMIT landing while a reader lists), or the store failed. Once
        # more; a store that fails again stops the reader rather than let it fall back to an older step.
        return self.store.get_bytes(f"{d}/{name}")

    def local(self, d: str, name: str, expected: Any) -> Path:
        path = self.cache / d / name
        if isinstance(expected, dict) and path.is_file() and _measure(path) == expected:
            return path  # cached by an earlier load (the caller verifies it again: cheap next to a download)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.store.get_file(f"{d}/{name}", path)
        except StoreError:
            if self.store.exists(f"{d}/{name}"):
                raise
            path.unlink(missing_ok=True)  # a stale cached copy must not pass for the missing file
        return path

    def delete(self, d: str, name: str) -> None:
        self.store.delete(f"{d}/{name}")

    def remove(self, d: str) -> None:
        """The step's objects (its COMMIT is gone), its folder on a file:// store, and its cached copy."""
        for name in self.names(d):
            self.delete(d, name)
        self.store.remove_empty(d)
        shutil.rmtree(self.cache / d, ignore_errors=True)  # mmap-ed tensors survive the unlink

    def abandon(self, d: str) -> None:
        """After a failed save: nothing now. The local temp files are gone already, and deleting the
        uploaded ones means more requests to a store that just failed (each retried for a minute);
        the step has no COMMIT, so it is ignored, and the next save's prune deletes it."""


# ---------------------------------------------------------------- snapshot and serialisation


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Rebuild a nested dict/list/tuple with fn applied to every tensor; other leaves are deep-copied."""
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return copy.deepcopy(obj)


def _torch_save(obj: Any, f: BinaryIO) -> None:
    """torch.save without torch's zip CRC: our crc32 covers the bytes; a second pass costs ~0.2 s/GB."""
    import torch
    import torch.utils.serialization.config as torch_serialization_config

    with torch_serialization_config.patch({"save.compute_crc32": False}):
        torch.save(obj, f)


# ---------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states, as tensors and ints (loadable with weights_only)."""
    import numpy as np
    import torch

    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": dict(
            keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, gauss=gauss
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's own GPU only: get_rng_state_all() lists every GPU the process can see (under Ray or
        # torchrun, the whole node), which a resume on fewer GPUs cannot restore. Nothing in training draws
        # from the CUDA generator (the decoder has no dropout; data order is a function of the step), so
        # keeping it is for completeness, and one device's state is all there is to keep.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(d: dict[str, Any]) -> None:
    """Inverse of rng_state(); missing entries (e.g. no CUDA when saved) are left alone."""
    import numpy as np
    import torch

    if "python" in d:
        version, internal, gauss_next = d["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "numpy" in d:
        n = d["numpy"]
        keys = n["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, int(n["pos"]), int(n["has_gauss"]), float(n["gauss"])))
    if "torch" in d:
        torch.set_rng_state(d["torch"].cpu())
    if "cuda" in d and torch.cuda.is_available():
        cuda = d["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints held every visible GPU's state
            here = torch.cuda.current_device()
            cuda = cuda[here] if here < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.cpu())


# ---------------------------------------------------------------- checkpointer


def _dir_name(step: int) -> str:
    return f"step_{step:09d}"


@dataclass(frozen=True)
class Committed:
    """A loadable checkpoint as its COMMIT describes it, for listings (lmctl checkpoints, status)."""

    step: int
    size: int  # bytes of its files
    time: float | None  # when it committed; None for checkpoints older than COMMIT's "time"
    location: str  # its folder, or its URL in a store

    @classmethod
    def of(cls, commit: dict[str, Any], where: str) -> Committed:
        files = [f for f in commit["files"].values() if isinstance(f, dict)]
        size = sum(f["size"] for f in files if isinstance(f.get("size"), int))
        t = commit.get("time")
        return cls(commit["step"], size, float(t) if isinstance(t, (int, float)) else None, where)


class Checkpointer:
    """Save, list, prune and load the checkpoints of one run under `root`.

    With async_save, save() copies tensors to CPU and returns; a background thread serialises, writes
    and commits. At most one save is in flight: the next save() (or wait/close/load) waits for it and
    re-raises its error, so a failing disk stops training instead of silently losing checkpoints.
    """

    def __init__(
        self,
        root: str | Path,
        keep: int = 3,
        async_save: bool = False,
        endpoint_url: str | None = None,
        cache_dir: Path | None = None,
        on_commit: Callable[[int], None] | None = None,
    ):
        """`root`: a folder, or a store URI (s3://..., file://...) whose downloads go to `cache_dir`
        (default cache_root()/checkpoints); `endpoint_url` applies to s3:// only. `on_commit(step)` runs
        after each commit (in the writer thread when async), e.g. to tell observers which step is safe."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if isinstance(root, str) and "://" in root:
            self.root: str | Path = root
            cache = Path(cache_dir or cache_root() / "checkpoints")
            self._io = _StoreFolder(open_store(root, endpoint_url), cache)
        else:
            self.root = Path(root)
            self._io = _Folder(self.root)
        self.keep = keep
        self.async_save = async_save
        self.on_commit = on_commit
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: list[torch.Tensor] = []  # the last snapshot's CPU tensors, reused by the next one

    def step_dir(self, step: int) -> Path | str:
        """The folder of `step` (a URL string for a store)."""
        return self._io.where(_dir_name(step))

    def _delete_step(self, step: int) -> None:
        """COMMIT first, then the whole folder: a crash half-way leaves an uncommitted step (never listed,
        removed by the next prune), never a torn committed one."""
        d = _dir_name(step)
        self._io.delete(d, COMMIT)
        self._io.remove(d)

    # ------------------------------------------------------------ saving

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Checkpoint `state` (a file per top-level key) as `step`; async: returns after the CPU snapshot."""
        self.wait()
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        for key in state:
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                raise ValueError(f"state key {key!r} must match {_KEY.pattern} (it becomes a file name)")
        meta_bytes = json.dumps({**meta, "step": step, "time": time.time()}, indent=1).encode()
        if not self.async_save:  # nothing runs while we write: no snapshot, no second copy in memory
            self._write(step, state, meta_bytes)
            return
        snap = self._snapshot(state)
        self._thread = threading.Thread(
            target=self._write_in_background, args=(step, snap, meta_bytes), name=f"checkpoint-{step}"
        )
        self._thread.start()

    def _snapshot(self, state: dict[str, Any]) -> dict[str, Any]:
        """Copy every tensor to CPU now, so training may mutate the originals as soon as save() returns.

        Copies go into the previous snapshot's buffers when shapes match: copying into memory that is
        already mapped runs ~6x faster than into fresh allocations (page faults), and buffers for CUDA
        tensors are pinned so the device-to-host copies run at full speed. The cost is one host copy of
        the state kept between saves (close() drops it). Views of the same memory (tied embeddings)
        map to one copy, so the file stores them once.
        """
        import torch

        old, new, memo, cuda = iter(self._buffers), [], {}, False

        def copy_tensor(t: torch.Tensor) -> torch.Tensor:
            nonlocal cuda
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if key not in memo:
                buf = next(old, None)
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                buf.copy_(t.detach(), non_blocking=True)
                cuda |= t.is_cuda
                memo[key] = buf
                new.append(buf)
            return memo[key]

        snap = _map_tensors(state, copy_tensor)
        if cuda:
            torch.cuda.synchronize()  # the non-blocking copies must land before the writer reads them
        self._buffers = new
        return snap

    def _write_in_background(self, step: int, snap: dict[str, Any], meta_bytes: bytes) -> None:
        try:
            self._write(step, snap, meta_bytes)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def _write(self, step: int, state: dict[str, Any], meta_bytes: bytes) -> None:
        d, io = _dir_name(step), self._io
        self._delete_step(step)  # leftovers of a crashed attempt at this step, or an older commit of it
        io.begin(d)
        files = {}
        try:
            for i, (key, value) in enumerate(state.items()):
                files[f"{key}.pt"] = io.write(d, f"{key}.pt", lambda f, v=value: _torch_save(v, f))
                if i == 0:
                    fault_point("checkpoint.after_file")
            files[META] = io.write(d, META, lambda f: f.write(meta_bytes))
            commit = {"step": step, "time": time.time(), "files": files}
            io.commit(d, json.dumps(commit, indent=1).encode())
        except BaseException:
            io.abandon(d)
            raise
        log.debug("step %d committed (%.1f MB)", step, sum(f["size"] for f in files.values()) / 1e6)
        try:
            self._prune(step)
        except (OSError, StoreError) as e:  # housekeeping: the step is committed, the next save prunes again
            log.warning("checkpoint step %d committed, but removing older steps failed: %s", step, e)
        if self.on_commit:
            self.on_commit(step)

    def _prune(self, current: int) -> None:
        """Drop committed steps beyond `keep` (never `current`) and uncommitted dirs older than the newest."""
        committed = self.committed_steps()
        if not committed:
            return
        for step in committed[: -self.keep]:
            if step != current:  # newer steps exist only if training went back to an older checkpoint
                self._delete_step(step)
        newest = committed[-1]
        for step in self._all_steps():
            if step < newest and step not in committed:
                self._delete_step(step)

    def wait(self) -> None:
        """Block until the in-flight save has committed; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """Wait for the in-flight save and free the snapshot buffers."""
        self.wait()
        self._buffers = []

    # ------------------------------------------------------------ reading

    def _all_steps(self) -> list[int]:
        return sorted(int(m[1]) for name in self._io.dirs() if (m := _STEP_DIR.fullmatch(name)))

    def _read_commit(self, step: int) -> dict[str, Any] | None:
        try:
            commit = json.loads(self._io.read_bytes(_dir_name(step), COMMIT))
        except (OSError, ValueError):
            return None
        ok = isinstance(commit, dict) and commit.get("step") == step and isinstance(commit.get("files"), dict)
        return commit if ok else None

    def committed(self) -> list[Committed]:
        """Ascending committed checkpoints (COMMIT present and well-formed; files are verified by load),
        with their size and time as COMMIT says: one small read per step, no torch."""
        commits = ((step, self._read_commit(step)) for step in self._all_steps())
        return [Committed.of(c, str(self.step_dir(s))) for s, c in commits if c is not None]

    def committed_steps(self) -> list[int]:
        """Ascending steps whose COMMIT marker is present and well-formed (files are verified by load)."""
        return [c.step for c in self.committed()]

    def latest(self) -> int | None:
        return max(self.committed_steps(), default=None)

    def load(
        self, step: int | None = None, map_location: Any = "cpu", keys: Iterable[str] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, meta) of `step`, or of the newest committed step that verifies; None when there is none.

        An explicit `step` that is missing or corrupt raises CheckpointError. `keys` loads only those
        top-level entries (e.g. ["model"] for evaluation). Tensors come back memory-mapped from the
        file when map_location is CPU: loading is then page-cache speed, and pages are copied on write.
        """
        self.wait()
        keys = None if keys is None else list(keys)
        if step is not None:
            return self._load(step, map_location, keys)
        for s in reversed(self.committed_steps()):
            try:
                return self._load(s, map_location, keys)
            except CheckpointError as e:
                log.warning("checkpoint step %d is unusable, falling back to an older one: %s", s, e)
        return None

    def _load(
        self, step: int, map_location: Any, keys: list[str] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        d = _dir_name(step)
        commit = self._read_commit(step)
        if commit is None:
            raise CheckpointError(f"{self.step_dir(step)}: no valid {COMMIT} marker")
        files = commit["files"]
        stored = [name.removesuffix(".pt") for name in files if name.endswith(".pt")]
        keys = stored if keys is None else keys
        if missing := [k for k in keys if k not in stored]:
            raise KeyError(f"checkpoint step {step} has no {missing}; it has {stored}")
        paths = {}
        for name in [f"{k}.pt" for k in keys] + [META]:
            paths[name] = self._io.local(d, name, files.get(name))  # a store downloads here
            self._verify(paths[name], files.get(name))
        meta = json.loads(paths[META].read_bytes())
        import torch

        # weights_only=True: everything we save is tensors, containers and plain scalars (rng_state()
        # turns numpy's state into a tensor), so no pickled code runs on load.
        load = lambda k: torch.load(paths[f"{k}.pt"], map_location=map_location, weights_only=True, mmap=True)
        return {k: load(k) for k in keys}, meta

    @staticmethod
    def _verify(path: Path, expected: dict[str, int] | None) -> None:
        """Size first (cheap, catches truncation), then crc32 (one read, which also warms the page cache)."""
        if not isinstance(expected, dict):
            raise CheckpointError(f"{path.name} is not listed in {COMMIT}")
        try:
            size = path.stat().st_size
        except OSError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if size != expected.get("size"):
            raise CheckpointError(f"{path}: {size} bytes, {COMMIT} says {expected.get('size')}")
        if _measure(path)["crc32"] != expected.get("crc32"):
            raise CheckpointError(f"{path}: crc32 does not match {COMMIT}")
