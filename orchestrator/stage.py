"""Stage a dataset to object storage: tokenize once, pack into shards, upload, commit with a manifest.

    <store>/datasets/<hash>/   tokenizer.json, units/<unit>.json, train_<unit>_*.bin, val_<unit>_*.bin,
                               stage.json, manifest.json (last)

`<hash>` covers everything that decides the bytes of the shards: the source (hub id and resolved commit,
or the sha256 of every local file), subset, split, text_field, max_tokens, val_fraction, shard_tokens,
and the tokenizer (its sha256, or the training recipe for 'train'). Staging the same thing again finds
the committed manifest and returns at once; a changed input lands in another directory.

The work is split into units, one per input file of the source (stage_unit.py): each is packed into shards
of its own, so units can run here one after another or as Ray tasks across a cluster, and the staged bytes
are the same either way. This module trains (or loads) the tokenizer once, hands out the units in order,
and lists their shards in the manifest in unit order.

Resume: the tokenizer is uploaded first and reused (a trained one is never trained twice), a finished unit
is recorded and skipped, and a unit cut short is redone, its shards already in the store verified and not
sent again. The manifest goes last, after every shard it lists is in place, so a crash at any instant
leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import DataConfig
from model.shards import MANIFEST, TOKENIZER, Manifest, dtype_for_vocab, file_sha256
from model.store import Store, StoreError, cache_root, open_store
from model.tokenizer import Tokenizer
from orchestrator.progress import StageProgress
from orchestrator.sources import (  # noqa: F401 - StageError and looks_local are asked for here by callers
    Source,
    StageError,
    check_local_dataset,
    looks_local,
    one_line,
    open_dataset,
    resolve_source,
    text_batches,
)
from orchestrator.stage_unit import UNITS, InProcess, RayUnits, UnitJob, UnitRecord, in_place, run_units

STAGE_VERSION = 2  # bump when the bytes staged for the same spec change (2: shards per unit of work)
STAGE_INFO = "stage.json"
DEFAULT_VOCAB = 32768
MIN_VOCAB, MAX_VOCAB = 257, 1 << 20
DEFAULT_SAMPLE_CHARS = 100_000_000  # tokenizer training sample: the first ~100 MB of text
BATCH_CHARS = 1 << 20  # text per encode_batch call: enough docs to keep every core busy, ~110 MB of encodings
UNIT_BYTES = 256 << 20  # local input files are grouped into units of work of about this size on disk


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a staging; the message says what stays in the store, which the same command reuses."""


def _kept(store: Store, prefix: str) -> str:
    """What an interrupted staging leaves in the store (listed there), and how to go on from there."""
    try:
        names = store.list(prefix)
    except Exception:
        names = []
    shards = sum(n.endswith(".bin") for n in names)
    kept = ["the tokenizer"] if any(n.endswith(TOKENIZER) for n in names) else []
    if shards:
        kept.append(f"{shards} shard{'s' * (shards != 1)}")
    if not kept:
        return "nothing was uploaded yet; run the same command again to start over"
    return (
        f"kept in {store.url(prefix)}: {' and '.join(kept)}; run the same command again to continue (what is "
        "in place is verified and not uploaded again)"
    )


@contextlib.contextmanager
def _interruption_says_what_is_kept(kept: Callable[[], str]) -> Iterator[None]:
    try:
        yield
    except StageInterrupted:
        raise
    except KeyboardInterrupt:
        raise StageInterrupted(kept()) from None


@dataclass
class StageResult:
    dataset_uri: str  # <store>/datasets/<hash>: what data.path should point at
    content_hash: str
    manifest: Manifest
    reused: bool  # the staged copy was already committed: nothing was read or written
    documents: int | None
    seconds: float  # end to end, this call
    tokenize_seconds: float = 0.0  # reading, encoding, packing and uploading shards: the part that scales
    uploaded: list[str] = field(default_factory=list)  # objects written by this call
    skipped: list[str] = field(default_factory=list)  # shards already in place (a resumed staging)
    units: int = 0  # units of work staged (or found staged) by this call
    nodes: int | None = None  # Ray nodes that staged them; None when this process did

    @property
    def tokens(self) -> int:
        return self.manifest.train_tokens + self.manifest.val_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "dataset_uri": self.dataset_uri,
            "content_hash": self.content_hash,
            "reused": self.reused,
            "dataset": m.dataset,
            "revision": m.revision,
            "documents": self.documents,
            "tokens": self.tokens,
            "train_tokens": m.train_tokens,
            "val_tokens": m.val_tokens,
            "train_shards": len(m.train),
            "val_shards": len(m.val),
            "vocab_size": m.vocab_size,
            "dtype": m.dtype,
            "tokenizer_sha256": m.tokenizer_sha256,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": None if self.reused else round(self.tokens_per_s, 1),
            "tokenize_seconds": round(self.tokenize_seconds, 3),
            "uploaded": self.uploaded,
            "skipped": self.skipped,
        }


# ---------------------------------------------------------------- sources


# ---------------------------------------------------------------- tokenizer and hash


def tokenizer_recipe(given: Tokenizer | None, vocab_size: int, sample_chars: int) -> dict[str, Any]:
    """What decides the tokenizer: a given one's hash, or how 'train' makes one (library version included,
    since another BPE trainer may merge differently)."""
    if given is not None:
        return {"sha256": given.sha256}
    import tokenizers

    return {
        "train": "byte-level-bpe",
        "vocab_size": vocab_size,
        "sample_chars": sample_chars,
        "tokenizers": tokenizers.__version__,
    }


def content_hash(
    spec: DataConfig, source: Source, recipe: dict[str, Any], unit_bytes: int = UNIT_BYTES
) -> str:
    key = {
        "unit_bytes": None if source.file_bytes is None else unit_bytes,
        "stage_version": STAGE_VERSION,
        "source": source.identity,
        "text_field": spec.text_field,
        "max_tokens": spec.max_tokens,
        "val_fraction": spec.val_fraction,
        "shard_tokens": spec.shard_tokens,
        "tokenizer": recipe,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _train_tokenizer(
    batches: Iterator[tuple[list[str], int]], vocab_size: int, sample_chars: int
) -> Tokenizer:
    def sample() -> Iterator[str]:
        seen = 0
        for texts, _ in batches:
            for text in texts:
                yield text
                seen += len(text)
                if seen >= sample_chars:
                    return

    try:
        return Tokenizer.train(sample(), vocab_size)
    finally:
        batches.close()


# ---------------------------------------------------------------- store side


def committed(store: Store, prefix: str) -> Manifest | None:
    """The manifest under `prefix` if it exists and every object it lists has its recorded size."""
    if not store.exists(f"{prefix}/{MANIFEST}"):
        return None
    try:
        manifest = Manifest.from_json(store.get_bytes(f"{prefix}/{MANIFEST}").decode())
    except ValueError:  # unreadable manifest: not a commit
        return None
    names = [(i.name, i.bytes) for i in manifest.train + manifest.val]
    with ThreadPoolExecutor(16) as pool:  # one HEAD per shard: concurrent, for big datasets on S3
        sizes = list(pool.map(lambda n: store.size(f"{prefix}/{n[0]}"), names))
    if sizes != [b for _, b in names] or not store.exists(f"{prefix}/{TOKENIZER}"):
        return None
    return manifest


# ---------------------------------------------------------------- staging


def default_work_dir(digest: str) -> Path:
    """$LMCTL_CACHE/stage/<hash> (default ~/.cache/lmctl): fixed per hash, so a killed run's leftovers are
    found and cleared by the next one."""
    return cache_root() / "stage" / digest


def trained_vocab(vocab_size: int | None) -> int:
    """The vocabulary a trained tokenizer gets: --vocab-size, checked, or DEFAULT_VOCAB."""
    vocab_size = DEFAULT_VOCAB if vocab_size is None else vocab_size
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise StageError(
            f"--vocab-size {vocab_size} is out of range: use {MIN_VOCAB} (256 bytes + end-of-text) "
            f"to {MAX_VOCAB}"
        )
    return vocab_size


def load_given_tokenizer(spec: DataConfig, vocab_size: int | None) -> Tokenizer | None:
    """None for 'train'; else the tokenizer data.tokenizer names: a tokenizer.json path or store URI, or
    hf:<folder or hub id> (a Hugging Face model's, as --init-from sets it)."""
    if spec.tokenizer == "train":
        return None
    try:
        tok = _tokenizer_at(spec.tokenizer)
    except (ValueError, OSError, StoreError) as e:  # OSError: a name too long for the filesystem
        raise StageError(f"--tokenizer: {one_line(e)} (give a tokenizer.json path, or 'train')") from None
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise StageError(
            f"--vocab-size {vocab_size} differs from the {tok.vocab_size} tokens of {spec.tokenizer}: "
            "vocab_size applies only to --tokenizer train; leave it out"
        )
    return tok


def _tokenizer_at(where: str) -> Tokenizer:
    if where.startswith("hf:"):
        from model.import_hf import load_hf_tokenizer
        from model.init_from import hf_folder

        return load_hf_tokenizer(hf_folder(where, weights=False))
    if "://" in where:
        folder, _, name = where.rpartition("/")
        local = cache_root() / "tokenizers" / hashlib.sha256(where.encode()).hexdigest()[:16] / name
        open_store(folder).get_file(name, local)
        return Tokenizer.load(local)
    return Tokenizer.load(where)


def stage(
    spec: DataConfig | dict[str, Any],
    store_uri: str,
    *,
    vocab_size: int | None = None,
    endpoint_url: str | None = None,
    sample_chars: int = DEFAULT_SAMPLE_CHARS,
    batch_chars: int = BATCH_CHARS,
    unit_bytes: int = UNIT_BYTES,
    work_dir: str | Path | None = None,
    progress: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    runner: InProcess | RayUnits | None = None,
) -> StageResult:
    """Stage `spec` into `<store_uri>/datasets/<hash>/`; a no-op (reused=True) when already committed.

    Raises StageError for bad input and StoreError for store trouble; nothing is committed then.
    progress: draw a bar on stderr; on_progress(facts): hear it as a dict (StageProgress.report).
    runner: where the units run (stage_unit.RayUnits for a Ray cluster); default this process.
    """
    t0 = time.perf_counter()
    spec = spec if isinstance(spec, DataConfig) else DataConfig.model_validate(dict(spec))
    given = load_given_tokenizer(spec, vocab_size)
    if given is None:
        vocab_size = trained_vocab(vocab_size)
    if sample_chars <= 0:
        raise StageError(f"the tokenizer sample must be positive, got {sample_chars} characters")
    store = open_store(store_uri, endpoint_url)
    store.check()
    source = resolve_source(spec)
    recipe = tokenizer_recipe(given, vocab_size or 0, sample_chars)
    digest = content_hash(spec, source, recipe, unit_bytes)
    prefix = f"datasets/{digest}"
    if (reused := _reuse(store, prefix, digest, t0)) is not None:
        return reused
    # No delete of a manifest whose objects are not all in place: another machine staging the same hash
    # may commit between our check and such a delete. The bytes are deterministic, so our upload rewrites
    # the same manifest, and until then nobody trusts it (committed() checks every object).

    ds = open_dataset(source, spec.text_field)
    batches = lambda: text_batches(ds, spec.text_field, source.dataset, batch_chars)  # noqa: E731
    with contextlib.closing(batches()) as first:
        if next(first, None) is None:
            raise StageError(
                f"dataset {source.dataset} has no text: every {spec.text_field!r} is empty or missing"
            )
    work = Path(work_dir) if work_dir else default_work_dir(digest)

    def waiting() -> None:
        print(f"waiting for another staging of {source.dataset} on this machine", file=sys.stderr, flush=True)

    kept = lambda: _kept(store, prefix)  # noqa: E731 - read at the interrupt
    with (
        _interruption_says_what_is_kept(kept),
        locked_work_dir(work, on_wait=waiting),
        contextlib.closing(StageProgress(progress, report=on_progress)) as bar,
    ):
        if (reused := _reuse(store, prefix, digest, t0)) is not None:
            return reused  # the staging we waited for committed it
        uploaded: list[str] = []
        tok = given or _stored_tokenizer(store, prefix, work)
        if tok is None:
            bar.phase("training tokenizer", stats=f"{vocab_size} tokens on the first {sample_chars:,} chars")
            tok = _train_tokenizer(batches(), vocab_size, sample_chars)
            bar.finish()
        tok.save(work / TOKENIZER)
        sha, size = file_sha256(work / TOKENIZER), (work / TOKENIZER).stat().st_size
        if not in_place(store, f"{prefix}/{TOKENIZER}", size, sha):
            store.put_file(work / TOKENIZER, f"{prefix}/{TOKENIZER}", sha256=sha)
            uploaded.append(TOKENIZER)

        t_tok = time.perf_counter()
        records = _stage_units(
            spec,
            source,
            source.units(ds.n_shards, unit_bytes),
            store_uri,
            endpoint_url,
            prefix,
            batch_chars,
            runner,
            bar,
        )
        t_tok = time.perf_counter() - t_tok
        bar.finish()
        manifest = _manifest_of(records, tok, spec, source)
        documents = sum(r.documents for r in records)
        info = {
            "stage_version": STAGE_VERSION,
            "content_hash": digest,
            "spec": spec.model_dump(exclude={"path"}),
            "source": source.identity,
            "tokenizer": recipe,
            "units": [r.label for r in records],
            "documents": documents,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        store.put_bytes(f"{prefix}/{STAGE_INFO}", json.dumps(info, indent=2).encode())
        store.put_bytes(f"{prefix}/{MANIFEST}", manifest.to_json().encode())  # the commit, last
        _sweep(store, prefix, records)
    uploaded += [name for r in records for name in r.uploaded] + [STAGE_INFO, MANIFEST]
    skipped = [name for r in records for name in r.skipped]
    seconds = time.perf_counter() - t0
    nodes = len({r.node for r in records}) if records[0].node else None
    return StageResult(
        store.url(prefix),
        digest,
        manifest,
        False,
        documents,
        seconds,
        t_tok,
        uploaded,
        skipped,
        len(records),
        nodes,
    )


def _stage_units(
    spec: DataConfig,
    source: Source,
    n_units: int,
    store_uri: str,
    endpoint_url: str | None,
    prefix: str,
    batch_chars: int,
    runner: InProcess | RayUnits | None,
    bar: StageProgress,
) -> list[UnitRecord]:
    """Every unit of the source in order, or with max_tokens the first units that reach it: each unit is
    capped at max_tokens, and the unit that crosses it is staged again capped at what is left, so the result
    stops after the document that reaches max_tokens however the units were spread."""
    seen = {"chars": 0, "documents": 0, "tokens": 0, "units": 0}
    # how far it is: in tokens towards max_tokens, else in characters of a known total, else in units
    by = "tokens" if spec.max_tokens else "chars" if source.total_chars else "units"
    bar.phase(
        "tokenizing", total={"tokens": spec.max_tokens, "chars": source.total_chars, "units": n_units}[by]
    )

    def show(chars: int, docs: int, tokens: int) -> None:
        now = {"chars": seen["chars"] + chars, "tokens": seen["tokens"] + tokens, "units": seen["units"]}
        bar.update(now[by], seen["documents"] + docs, now["tokens"])

    def add(record: UnitRecord) -> None:
        for key, n in (("chars", record.chars), ("documents", record.documents), ("tokens", record.tokens)):
            seen[key] += n
        seen["units"] += 1
        show(0, 0, 0)

    runner = runner or InProcess(on_batch=show)
    job = lambda k, cap: UnitJob(  # noqa: E731
        source,
        spec.text_field,
        n_units,
        k,
        cap,
        store_uri,
        endpoint_url,
        prefix,
        spec.shard_tokens,
        spec.val_fraction,
        batch_chars,
    )
    cap = spec.max_tokens
    enough = lambda done: cap is not None and sum(r.tokens for r in done) >= cap  # noqa: E731
    records = run_units(runner, (job(k, cap) for k in range(n_units)), enough, add)
    before = sum(r.tokens for r in records[:-1])
    if cap is not None and enough(records) and before:
        (records[-1],) = run_units(runner, iter([job(len(records) - 1, cap - before)]), lambda done: False)
    return records


def _sweep(store: Store, prefix: str, records: list[UnitRecord]) -> None:
    """Delete what units past a max_tokens cap left (staged ahead, or cut short when cancelled): the committed
    dataset is its tokenizer, stage.json, the manifest, the listed units' records and their shards."""
    keep = {TOKENIZER, STAGE_INFO, MANIFEST}
    keep |= {f"{UNITS}/{r.label}.json" for r in records} | {i.name for r in records for i in r.train + r.val}
    for key in store.list(prefix):
        if key.removeprefix(f"{prefix}/") not in keep:
            with contextlib.suppress(Exception):  # a leftover, not worth failing a committed staging over
                store.delete(key)


def _manifest_of(records: list[UnitRecord], tok: Tokenizer, spec: DataConfig, source: Source) -> Manifest:
    """The units' shards listed in unit order: the same bytes whichever machines staged which unit."""
    train = [i for r in records for i in r.train]
    val = [i for r in records for i in r.val]
    return Manifest(
        dataset=source.dataset,
        revision=source.revision,
        tokenizer_sha256=tok.sha256,
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        dtype=dtype_for_vocab(tok.vocab_size).name,
        shard_tokens=spec.shard_tokens,
        val_fraction=spec.val_fraction,
        train=train,
        val=val,
        train_tokens=sum(i.tokens for i in train),
        val_tokens=sum(i.tokens for i in val),
    )


def _reuse(store: Store, prefix: str, digest: str, t0: float) -> StageResult | None:
    """The result for a dataset already committed under `prefix`, else None."""
    if (manifest := committed(store, prefix)) is None:
        return None
    try:
        documents = json.loads(store.get_bytes(f"{prefix}/{STAGE_INFO}")).get("documents")
    except Exception:
        documents = None
    return StageResult(store.url(prefix), digest, manifest, True, documents, time.perf_counter() - t0)


@contextlib.contextmanager
def locked_work_dir(work: Path, on_wait: Callable[[], None]) -> Iterator[Path]:
    """An empty work dir, removed afterwards, held under an exclusive lock so two stagings of one hash
    on a machine cannot clear each other's files: the second waits for the first (on_wait() tells the
    user), then usually finds the dataset committed. The OS drops the lock when a process dies."""
    import fcntl

    work.parent.mkdir(parents=True, exist_ok=True)
    with open(work.with_name(f"{work.name}.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(work, ignore_errors=True)  # leftovers of a killed run: rebuilt from the stream
        work.mkdir()
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _stored_tokenizer(store: Store, prefix: str, work: Path) -> Tokenizer | None:
    """The tokenizer an interrupted staging of the same hash already uploaded (it was verified then)."""
    key = f"{prefix}/{TOKENIZER}"
    if not store.exists(key):
        return None
    store.get_file(key, work / TOKENIZER)
    return Tokenizer.load(work / TOKENIZER)


def stage_for_run(spec: Any, record: Any, path: Path, progress: bool = False, runner: Any = None) -> Any:
    """A run's dataset (spec: RunSpec) staged into its store once; config.yaml then names the staged copy
    (data.path). Warns when the run will see that data more than once. Called by the driver (a local run in
    this process; a cloud run's head node with `runner` = RayUnits over its cluster) and by a cloud launch of
    local files; they record data.path in run.json."""
    from model.staged import staged_manifest
    from orchestrator.sanity import warn_epochs

    if spec.data.mixture:
        return _stage_mixture(spec, record, path, progress, runner)
    if spec.data.path:
        warn_epochs(spec, staged_manifest(spec.data.path))  # and still there?
        return spec
    result = _stage_said(spec.data, spec, record, path, progress, runner)
    warn_epochs(spec, result.manifest)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"path": result.dataset_uri})})
    spec.write(path)
    return spec


def stages_in_the_cloud(spec: Any) -> bool:
    """Whether a cloud run's data is staged on its own nodes: every source not yet staged is on the hub (a
    local file is only on this machine, so a run with one stages here, as a whole)."""
    sources = [s for s in (spec.data.mixture or [spec.data]) if not s.path]
    return bool(sources) and not any(looks_local(s.dataset) for s in sources)


def pin_revisions(spec: Any) -> Any:
    """The spec with each hub source's revision resolved to its commit (one API call each, no data read),
    so every node and every recovery of a cloud run stages the same bytes."""
    from orchestrator.sources import hub_source

    d = spec.data
    if not d.mixture:
        return spec.model_copy(update={"data": d.model_copy(update={"revision": hub_source(d).revision})})
    pinned = [
        src
        if src.path
        else src.model_copy(update={"revision": hub_source(_one_source(d, src, d.tokenizer)).revision})
        for src in d.mixture
    ]
    return spec.model_copy(update={"data": d.model_copy(update={"mixture": pinned})})


def _one_source(d: DataConfig, src: Any, tokenizer: str) -> DataConfig:
    """A mixture's source as a dataset of its own: data's fields, the source's name, subset and revision."""
    one = {"dataset": src.dataset, "subset": src.subset or d.subset, "revision": src.revision or d.revision}
    return d.model_copy(update={**one, "tokenizer": tokenizer, "mixture": [], "path": None})


def _stage_mixture(spec: Any, record: Any, path: Path, progress: bool, runner: Any) -> Any:
    """Each source of data.mixture staged once (reused by any mixture that names it), the first with
    data.tokenizer and the others with the first's tokenizer, so one vocabulary covers them all; config.yaml
    then names every staged copy, and data.path the first's (its tokenizer is the run's)."""
    from model.staged import data_cache_dir, fetch_tokenizer, staged_manifest

    d, tokenizer, sources = spec.data, spec.data.tokenizer, []
    for src in d.mixture:
        if src.path is None:
            one = _one_source(d, src, tokenizer)
            staged = _stage_said(one, spec, record, path, progress, runner)
            src = src.model_copy(update={"path": staged.dataset_uri})
        else:
            staged_manifest(src.path)  # and still there?
        sources.append(src)
        if len(sources) == 1:  # the others are staged with the first one's tokenizer
            tokenizer = str(fetch_tokenizer(src.path, data_cache_dir()))
    data = d.model_copy(update={"mixture": sources, "path": sources[0].path})
    spec = spec.model_copy(update={"data": data})
    spec.write(path)
    return spec


def _stage_said(
    data: DataConfig, spec: Any, record: Any, path: Path, progress: bool, runner: Any
) -> StageResult:
    """stage() of one dataset of a run, said in the run's log and reported in staging.json as it goes."""
    from orchestrator.runs import say

    say(f"staging {data.dataset} to {record.store}")
    with StagingReport(path, data.dataset, record) as report:
        result = stage(
            data,
            record.store,
            vocab_size=spec.model.vocab_size,
            progress=progress,
            on_progress=report,
            runner=runner,
        )
    done = "reused" if result.reused else "staged"
    where = f", {result.units} units on {result.nodes} node{'s' * (result.nodes > 1)}" if result.nodes else ""
    say(f"{done} {result.tokens:,} tokens at {result.dataset_uri} ({result.seconds:.1f} s{where})")
    return result


class StagingReport:
    """on_progress of a run's staging: runs/<name>/staging.json, replaced whole (what `status` and `attach`
    show while the run stages), and a line in the run's log every SAY_EVERY_S (what `logs` shows). On a cloud
    run's head node the file is also put in the store every MIRROR_EVERY_S, where the launching machine reads
    it. The file goes when the staging ends, however it ends."""

    SAY_EVERY_S = 30.0
    MIRROR_EVERY_S = 10.0

    def __init__(self, path: Path, dataset: str, record: Any):
        from orchestrator import runs

        self.file, self.dataset, self._said, self._mirrored = (
            path / runs.STAGING,
            dataset,
            time.monotonic(),
            0.0,
        )
        self.store = open_store(record.store) if record.mode == "cloud" else None
        self.key = runs.store_key(record.name, runs.STAGING)

    def __call__(self, facts: dict[str, Any]) -> None:
        from orchestrator.progress import human
        from orchestrator.runs import say

        text = json.dumps({"dataset": self.dataset, **facts, "time": time.time()})
        tmp = self.file.with_name(f".{self.file.name}.tmp")
        tmp.write_text(text)
        tmp.replace(self.file)
        if self.store is not None and time.monotonic() - self._mirrored >= self.MIRROR_EVERY_S:
            self._mirrored = time.monotonic()
            with contextlib.suppress(Exception):  # progress is a courtesy: never fail a staging over it
                self.store.put_bytes(self.key, text.encode())
        if facts.get("tokens") and time.monotonic() - self._said >= self.SAY_EVERY_S:
            self._said = time.monotonic()
            eta = f", eta {facts['eta_s']:.0f} s" if facts.get("eta_s") is not None else ""
            say(
                f"{facts['phase']} {self.dataset}: {human(facts['documents'])} documents, "
                f"{human(facts['tokens'])} tokens, {human(facts['tokens_per_s'])} tokens/s{eta}"
            )

    def __enter__(self) -> StagingReport:
        return self

    def __exit__(self, *exc) -> None:
        self.file.unlink(missing_ok=True)
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.delete(self.key)
