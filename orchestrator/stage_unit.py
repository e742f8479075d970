"""One unit of work of a staging: one input file of the source (datasets' `shard(n_units, k)`), read, encoded,
packed into shards named after the unit, uploaded, and recorded in `units/<label>.json` last.

A unit's shards are a pure function of (its rows, the tokenizer, shard_tokens, val_fraction, its cap), so the
units of a staging can run in one process or as Ray tasks spread over a cluster, in any order and any number
at once, and the staged bytes are the same. The record makes a finished unit skip on resume; a unit killed
half way is redone, and the shards it had uploaded are verified in place and not sent again.

Two runners: `InProcess` (this process, one unit after another, with a progress callback per batch) and
`RayUnits` (one Ray task per unit, retried by Ray when a node dies).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.faults import fault_point
from model.shards import TOKENIZER, ShardInfo, ShardWriter
from model.store import Store, cache_root, open_store
from model.tokenizer import Tokenizer
from orchestrator.sources import Source, open_dataset, text_batches

UNITS = "units"  # <prefix>/units/<label>.json: one finished unit each


def in_place(store: Store, key: str, size: int, sha256: str) -> bool:
    """The stored object is exactly these bytes (size, then the sha256 the store keeps; a HEAD each on S3)."""
    return store.size(key) == size and store.stored_sha256(key) == sha256


class Uploader:
    """Uploads shards in a background thread as they are cut, skipping those already in place (resume).

    At most `depth` shards wait, so a slow link slows tokenizing instead of filling the disk.
    """

    def __init__(self, store: Store, prefix: str, depth: int = 4):
        self.store, self.prefix = store, prefix
        self.uploaded: list[str] = []
        self.skipped: list[str] = []
        self.error: BaseException | None = None
        self._q: queue.Queue = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="stage-upload", daemon=True)
        self._thread.start()

    def submit(self, path: Path, info: ShardInfo) -> None:
        while True:
            if self.error is not None:
                raise self.error
            with contextlib.suppress(queue.Full):
                self._q.put((path, info), timeout=0.2)
                return

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            if self.error is not None:
                continue  # drain until close()
            path, info = item
            try:
                key = f"{self.prefix}/{info.name}"
                if in_place(self.store, key, info.bytes, info.sha256):
                    self.skipped.append(info.name)
                else:
                    self.store.put_file(path, key, sha256=info.sha256)
                    self.uploaded.append(info.name)
                path.unlink(missing_ok=True)
                fault_point("stage.after_shard")
            except BaseException as e:
                self.error = e

    def close(self) -> None:
        """Wait for every submitted shard; re-raise the first upload error."""
        self._q.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------- tokenize and pack


def _encode(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All ids of a batch as one flat uint32 array plus per-document lengths (Encodings freed at once)."""
    ids = tok.encode_batch(texts)
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), np.uint32, int(lens.sum())), lens


def encoded(
    tok: Tokenizer, batches: Iterator[tuple[list[str], int]], workers: int = 2
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(ids, lengths, characters) per batch, in order, with `workers` batches in flight."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="stage-encode")
    pending: deque = deque()
    try:
        for texts, chars in batches:
            pending.append((pool.submit(_encode, tok, texts), chars))
            if len(pending) > workers:
                fut, c = pending.popleft()
                yield (*fut.result(), c)
        while pending:
            fut, c = pending.popleft()
            yield (*fut.result(), c)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        getattr(batches, "close", lambda: None)()


def pack(
    writer: ShardWriter,
    batches: Iterator[tuple[np.ndarray, np.ndarray, int]],
    max_tokens: int | None,
    on_batch: Callable[[int, int, int], None] = lambda chars, docs, tokens: None,
) -> int:
    """Add documents to `writer` in order until the stream ends or `max_tokens` is reached; returns docs."""
    docs = chars_seen = 0
    m = writer.manifest
    for ids, lens, chars in batches:
        ends = np.cumsum(lens).tolist()
        for start, end in zip([0, *ends[:-1]], ends, strict=True):
            writer.add(ids[start:end])
            docs += 1
            if max_tokens is not None and m.train_tokens + m.val_tokens >= max_tokens:
                on_batch(chars_seen + chars, docs, m.train_tokens + m.val_tokens)
                return docs
        chars_seen += chars
        on_batch(chars_seen, docs, m.train_tokens + m.val_tokens)
    return docs


# ---------------------------------------------------------------- one unit


@dataclass(frozen=True)
class UnitJob:
    """Everything a unit needs, picklable for a Ray task: it reads its rows and the tokenizer itself."""

    source: Source
    text_field: str
    n_units: int
    index: int
    cap: int | None  # stop after the document that reaches this many tokens (max_tokens, or what is left)
    store_uri: str
    endpoint_url: str | None
    prefix: str  # datasets/<hash>
    shard_tokens: int
    val_fraction: float
    batch_chars: int

    @property
    def label(self) -> str:
        """In shard and record names: the unit's index, and its cap when it has one (a capped unit's last
        shards differ from an uncapped one's)."""
        return f"{self.index:05d}" + (f"c{self.cap}" if self.cap is not None else "")

    @property
    def record_key(self) -> str:
        return f"{self.prefix}/{UNITS}/{self.label}.json"


@dataclass
class UnitRecord:
    """What a finished unit staged: its shards in order, and the counts progress and stage.json report."""

    label: str
    documents: int
    chars: int
    train: list[ShardInfo]
    val: list[ShardInfo]
    uploaded: list[str] = field(default_factory=list)  # objects this call sent (not part of the record)
    skipped: list[str] = field(default_factory=list)  # shards it found in place
    node: str | None = None  # the Ray node that staged it (RayUnits), for the log

    @property
    def tokens(self) -> int:
        return sum(i.tokens for i in self.train + self.val)

    def to_json(self) -> str:
        shards = {s: [i.model_dump() for i in getattr(self, s)] for s in ("train", "val")}
        return json.dumps({"label": self.label, "documents": self.documents, "chars": self.chars, **shards})

    @classmethod
    def from_json(cls, text: str) -> UnitRecord:
        raw = json.loads(text)
        shards = {s: [ShardInfo.model_validate(i) for i in raw[s]] for s in ("train", "val")}
        return cls(raw["label"], raw["documents"], raw["chars"], **shards)


def finished(store: Store, job: UnitJob) -> UnitRecord | None:
    """The unit's record, if a staging wrote it and every shard it lists is in the store at its size."""
    try:
        record = UnitRecord.from_json(store.get_bytes(job.record_key).decode())
    except Exception:  # missing or unreadable: not finished
        return None
    if any(store.size(f"{job.prefix}/{i.name}") != i.bytes for i in record.train + record.val):
        return None
    return record


def stage_unit(
    job: UnitJob, on_batch: Callable[[int, int, int], None] = lambda chars, docs, tokens: None
) -> UnitRecord:
    """Stage one unit into the store and record it; a unit already recorded is returned as it is."""
    store = open_store(job.store_uri, job.endpoint_url)
    if (done := finished(store, job)) is not None:
        return done
    root = cache_root() / "stage"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f"unit-{job.label}-") as work:
        work = Path(work)
        store.get_file(f"{job.prefix}/{TOKENIZER}", work / TOKENIZER)  # verified when the staging uploaded it
        tok = Tokenizer.load(work / TOKENIZER)
        rows = open_dataset(job.source, job.text_field).shard(num_shards=job.n_units, index=job.index)
        uploader = Uploader(store, job.prefix)
        try:
            writer = ShardWriter(
                work / "shards",
                eot_id=tok.eot_id,
                vocab_size=tok.vocab_size,
                shard_tokens=job.shard_tokens,
                val_fraction=job.val_fraction,
                dataset=job.source.dataset,
                tokenizer_sha256=tok.sha256,
                revision=job.source.revision,
                on_shard=lambda path, info, split: uploader.submit(path, info),
                unit=job.label,
            )
            chars = [0]

            def counted(c: int, docs: int, tokens: int) -> None:
                chars[0] = c
                on_batch(c, docs, tokens)

            batches = text_batches(rows, job.text_field, job.source.dataset, job.batch_chars)
            with contextlib.closing(encoded(tok, batches)) as stream:
                documents = pack(writer, stream, job.cap, counted)
            manifest = writer.close()
        finally:
            uploader.close()
    record = UnitRecord(job.label, documents, chars[0], manifest.train, manifest.val)
    store.put_bytes(job.record_key, record.to_json().encode())  # last: the unit is finished
    fault_point("stage.after_unit")
    record.uploaded = [*uploader.uploaded, f"{UNITS}/{job.label}.json"]
    record.skipped = uploader.skipped
    return record


# ---------------------------------------------------------------- runners


class InProcess:
    """Units one after another in this process: tokenizers' encode_batch already uses every core."""

    slots = 1

    def __init__(self, on_batch: Callable[[int, int, int], None] | None = None):
        self.on_batch = on_batch or (lambda chars, docs, tokens: None)
        self._jobs: dict[int, UnitJob] = {}

    def submit(self, job: UnitJob) -> int:
        self._jobs[handle := len(self._jobs)] = job
        return handle

    def wait_any(self, pending: list[Any]) -> tuple[Any, UnitRecord]:
        return pending[0], stage_unit(self._jobs[pending[0]], self.on_batch)

    def cancel(self, pending: list[Any]) -> None:
        pass


class RayUnits:
    """One Ray task per unit on the Ray cluster this process is connected to (ray.init first), each with
    `cpus` CPUs; Ray reruns a task whose node died (its record makes a finished one skip)."""

    def __init__(self, cpus: int = 1, retries: int = 3):
        import ray

        self.ray = ray
        self.cpus = cpus
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
        # SPREAD: units go to every node, not first to fill the one this process runs on
        self._task = ray.remote(num_cpus=cpus, max_retries=retries, scheduling_strategy="SPREAD")(_unit_task)

    def submit(self, job: UnitJob) -> Any:
        return self._task.remote(job, self.cpus)

    def wait_any(self, pending: list[Any]) -> tuple[Any, UnitRecord]:
        (ref,), _ = self.ray.wait(pending, num_returns=1)
        return ref, self.ray.get(ref)

    def cancel(self, pending: list[Any]) -> None:
        for ref in pending:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)


def _unit_task(job: UnitJob, cpus: int) -> UnitRecord:
    """A Ray worker's unit: tokenizers' thread pool sized to the task's CPUs, so tasks sharing a node do not
    oversubscribe it (the variable is read when the pool first starts, in this worker process)."""
    import os

    import ray

    os.environ.setdefault("RAYON_NUM_THREADS", str(cpus))
    record = stage_unit(job)
    record.node = ray.get_runtime_context().get_node_id()
    return record


def run_units(
    runner: InProcess | RayUnits,
    jobs: Iterator[UnitJob],
    enough: Callable[[list[UnitRecord]], bool],
    on_unit: Callable[[UnitRecord], None] = lambda record: None,
) -> list[UnitRecord]:
    """Stage `jobs` with up to runner.slots at once, submitted in order; returns the records of the units
    in order, up to the first prefix for which `enough(prefix)` holds (units after it are cancelled)."""
    submitted: list[tuple[UnitJob, Any]] = []
    done: dict[int, UnitRecord] = {}
    pending: dict[Any, int] = {}
    order: list[UnitRecord] = []
    jobs = iter(jobs)
    while True:
        while len(pending) < runner.slots and (job := next(jobs, None)) is not None:
            handle = runner.submit(job)
            pending[handle] = len(submitted)
            submitted.append((job, handle))
        if not pending:
            return order
        handle, record = runner.wait_any(list(pending))
        done[pending.pop(handle)] = record
        on_unit(record)
        while len(order) in done:
            order.append(done.pop(len(order)))
            if enough(order):
                runner.cancel(list(pending))
                return order
