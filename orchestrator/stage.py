"""Stage a dataset to object storage: tokenize once, pack into shards, upload, commit with a manifest.

    <store>/datasets/<hash>/   tokenizer.json, train_*.bin, val_*.bin, stage.json, manifest.json (last)

`<hash>` covers everything that decides the bytes of the shards: the source (hub id and resolved commit,
or the sha256 of every local file), subset, split, text_field, max_tokens, val_fraction, shard_tokens,
and the tokenizer (its sha256, or the training recipe for 'train'). Staging the same thing again finds
the committed manifest and returns at once; a changed input lands in another directory.

Resume: shard contents are a pure function of that hash, so an interrupted staging re-reads the stream
from the start and skips every shard whose stored copy already has the right size and sha256. The
tokenizer is uploaded first and reused on resume (a trained one is never trained twice). The manifest
goes last, after every shard it lists is uploaded and verified, so a crash at any instant leaves
nothing that looks complete.

Speed: tokenizers' encode_batch runs in Rust on all cores with the GIL released. Two encoder threads
keep one batch encoding while the other batch's ids are copied out, the main thread reads and packs,
and an upload thread ships each shard as soon as ShardWriter cuts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import queue
import re
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.config import DataConfig
from model.faults import fault_point
from model.shards import MANIFEST, TOKENIZER, Manifest, ShardInfo, ShardWriter, file_sha256
from model.store import Store, cache_root, open_store
from model.tokenizer import Tokenizer
from orchestrator.progress import StageProgress

STAGE_VERSION = 1  # bump when the bytes staged for the same spec change
STAGE_INFO = "stage.json"
DEFAULT_VOCAB = 32768
MIN_VOCAB, MAX_VOCAB = 257, 1 << 20
DEFAULT_SAMPLE_CHARS = 100_000_000  # tokenizer training sample: the first ~100 MB of text
BATCH_CHARS = 1 << 20  # text per encode_batch call: enough docs to keep every core busy, ~110 MB of encodings
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".txt": "text", ".parquet": "parquet"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


class StageError(ValueError):
    """Bad input or an unreadable source; the message is one line that says what and what is allowed."""


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a staging; the message says what stays in the store, which the same command reuses."""


def _kept(uri: str, tokenizer: bool, uploader: Uploader | None) -> str:
    """What an interrupted staging leaves in the store, and how to go on from there."""
    shards = len(uploader.uploaded) + len(uploader.skipped) if uploader else 0
    kept = ["the tokenizer"] if tokenizer else []
    if shards:
        kept.append(f"{shards} shard{'s' * (shards != 1)}")
    if not kept:
        return "nothing was uploaded yet; run the same command again to start over"
    return (
        f"kept in {uri}: {' and '.join(kept)}; run the same command again to continue (what is in place is "
        "verified and not uploaded again)"
    )


@contextlib.contextmanager
def _interruption_says_what_is_kept(kept: Callable[[], str]) -> Iterator[None]:
    try:
        yield
    except StageInterrupted:
        raise
    except KeyboardInterrupt:
        raise StageInterrupted(kept()) from None


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


@dataclass
class Source:
    """Where documents come from: `load_args` for datasets.load_dataset, `identity` for the hash."""

    dataset: str  # what the manifest records: an absolute path or a hub id
    revision: str | None
    identity: dict[str, Any]
    load_args: dict[str, Any]
    total_chars: int | None  # an estimate of the text to read, for the ETA; None when unknown


def _format_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return LOCAL_FORMATS.get(suffixes[-1]) if suffixes else None


def looks_local(dataset: str) -> bool:
    """Whether `dataset` names a local file or folder (existing or not) rather than a hub id: the one answer
    for staging and launch."""
    return dataset.startswith(("/", ".", "~")) or bool(_format_of(Path(dataset))) or dataset.count("/") > 1


def _text_chars(path: Path, text_field: str) -> int | None:
    """Uncompressed size of the text in a file: its size for json/text, parquet's column statistics."""
    if path.suffix.lower() in COMPRESSED:
        return None
    if _format_of(path) != "parquet":
        return path.stat().st_size
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        col = meta.schema.names.index(text_field)
        return sum(meta.row_group(i).column(col).total_uncompressed_size for i in range(meta.num_row_groups))
    except Exception:
        return None


def _text_split_rule(path: Path, files: list[Path]) -> dict[str, str]:
    """Each .txt file is one document (datasets' default makes every line one, with an end-of-text token
    after it, so the model would learn to stop after a line). A folder mixing .txt with other formats is
    refused: datasets would read only its most common kind."""
    formats = {_format_of(f) for f in files}
    if "text" not in formats:
        return {}
    if len(formats) > 1:
        raise StageError(
            f"folder {path} mixes .txt files with {', '.join(sorted(f for f in formats if f != 'text'))} "
            "files: stage each kind from a folder of its own"
        )
    return {"sample_by": "document"}


def _local_files(spec: DataConfig, path: Path) -> tuple[str | None, list[Path], list[str], dict[str, Any]]:
    """(format, files, their names in the identity, datasets.load_dataset args) of a local file or folder."""
    allowed = ", ".join(LOCAL_FORMATS)
    if spec.revision:
        raise StageError(f"--revision applies to hub datasets only; {path} is a local path")
    if path.is_file():
        fmt = _format_of(path)
        if fmt is None:
            raise StageError(f"{path} is not a supported data file: use {allowed}, optionally compressed")
        if spec.subset:
            raise StageError(f"--subset applies to hub datasets and dataset folders, not to the file {path}")
        files, names = [path], [""]  # a file's name is not part of its identity: its bytes and format are
        load_args = {"path": fmt, "data_files": {"train": [str(path)]}, "split": spec.split}
    else:
        visible = lambda p: not any(s.startswith(".") for s in p.relative_to(path).parts)  # noqa: E731
        files = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p) and visible(p))
        if not files:
            raise StageError(f"folder {path} holds no data files: expected {allowed} files")
        fmt, names = None, [f.relative_to(path).as_posix() for f in files]
        load_args = {"path": str(path), "name": spec.subset, "split": spec.split}
    return fmt, files, names, load_args


def check_local_dataset(spec: DataConfig) -> None:
    """Before a run is launched: a local dataset can be read and has the text field (its first rows are read;
    nothing is hashed or tokenized). Hub datasets are checked when staged, before any GPU is rented."""
    path = Path(spec.dataset).expanduser()
    if not path.exists():
        return
    fmt, files, names, load_args = _local_files(spec, path.resolve())
    load_args.update(_text_split_rule(path.resolve(), files))
    open_dataset(Source(str(path), None, {}, load_args, None), spec.text_field)


def _local_source(spec: DataConfig, path: Path) -> Source:
    fmt, files, names, load_args = _local_files(spec, path)
    split_rule = _text_split_rule(path, files)
    load_args.update(split_rule)
    identity = {
        "kind": "local",
        "format": fmt,
        "files": [[name, file_sha256(f)] for name, f in zip(names, files, strict=True)],
        "subset": spec.subset,
        "split": spec.split,
        **split_rule,  # the rule decides the documents: a .txt staged line by line before is not reused
    }
    sizes = [_text_chars(f, spec.text_field) for f in files]
    total = None if None in sizes else sum(sizes)
    return Source(str(path), None, identity, load_args, total)


def _hub_source(spec: DataConfig) -> Source:
    """Resolve the revision to a commit, so the hash (and the data streamed) cannot drift with `main`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().dataset_info(spec.dataset, revision=spec.revision)  # HF_TOKEN from the environment
    except RevisionNotFoundError:
        raise StageError(f"revision {spec.revision!r} of hub dataset {spec.dataset} does not exist") from None
    except RepositoryNotFoundError:
        raise StageError(
            f"dataset {spec.dataset!r} is not a local file or folder, and the Hugging Face hub has no "
            "dataset of that id that these credentials can read (private or gated sets need HF_TOKEN)"
        ) from None
    except Exception as e:
        raise StageError(
            f"dataset {spec.dataset!r} is not a local file or folder, and the Hugging Face hub could not be "
            f"asked about it: {_one_line(e)}"
        ) from None
    load_args = {"path": spec.dataset, "name": spec.subset, "split": spec.split, "revision": info.sha}
    identity = {
        "kind": "hub",
        "id": spec.dataset,
        "revision": info.sha,
        "subset": spec.subset,
        "split": spec.split,
    }
    return Source(spec.dataset, info.sha, identity, load_args, None)


def resolve_source(spec: DataConfig) -> Source:
    """A local file or folder when one exists at `dataset`, else a hub id; anything else is an error."""
    try:
        path = Path(spec.dataset).expanduser()
    except RuntimeError:  # '~name' of no such user: no such path
        path = Path(spec.dataset)
    try:
        exists = path.exists()
    except OSError:  # a name longer than the filesystem allows: no such path
        exists = False
    if exists:
        return _local_source(spec, path.resolve())
    if looks_local(spec.dataset) or not HUB_ID.fullmatch(spec.dataset):
        shown = spec.dataset if spec.dataset.isprintable() else repr(spec.dataset)  # one line, always
        raise StageError(
            f"dataset path {shown} does not exist: give a file or folder of "
            f"{', '.join(LOCAL_FORMATS)} files, or a hub id such as HuggingFaceFW/fineweb-edu"
        )
    return _hub_source(spec)


def open_dataset(source: Source, text_field: str) -> Any:
    """datasets' streaming IterableDataset over `source`, reduced to the text column (checked to exist)."""
    import datasets

    if "torch" not in sys.modules:
        # datasets imports torch (~1.5 s, ~300 MB) only to share an epoch counter with DataLoader workers;
        # staging has none, and the control plane does no tensor work
        datasets.config.TORCH_AVAILABLE = False
    quiet = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)  # it logs a bad file's error itself: said once, below
    try:
        ds = datasets.load_dataset(**source.load_args, streaming=True)
        columns = ds.column_names
        if columns is None:  # some streaming builders learn their columns from the first row
            columns = list(next(iter(ds)))
    except StopIteration:  # no first row; also datasets' json builder on a file with no rows
        raise StageError(f"dataset {source.dataset} is empty: it has no rows") from None
    except Exception as e:
        raise StageError(f"cannot read dataset {source.dataset}: {_one_line(e)}") from None
    finally:
        datasets.logging.set_verbosity(quiet)
    if text_field not in columns:
        raise StageError(
            f"dataset {source.dataset} has no field {text_field!r}; fields found: "
            f"{', '.join(columns) or 'none'} (pick one with --text-field)"
        )
    dtype = getattr((ds.features or {}).get(text_field), "dtype", "string")
    if dtype not in ("string", "large_string"):
        raise StageError(f"field {text_field!r} of dataset {source.dataset} holds {dtype}, not text")
    return ds.select_columns([text_field])


def text_batches(ds: Any, text_field: str, name: str, batch_chars: int) -> Iterator[tuple[list[str], int]]:
    """(texts, characters) batches of about `batch_chars`, in dataset order; empty and null texts skipped."""
    batch: list[str] = []
    chars = 0
    try:
        for rows in ds.iter(batch_size=1024):
            for text in rows[text_field]:
                if not text:
                    continue
                if not isinstance(text, str):
                    raise StageError(
                        f"field {text_field!r} of dataset {name} holds {type(text).__name__}, not text"
                    )
                batch.append(text)
                chars += len(text)
                if chars >= batch_chars:
                    yield batch, chars
                    batch, chars = [], 0
    except StageError:
        raise
    except Exception as e:
        raise StageError(f"cannot read dataset {name}: {_one_line(e)}") from None
    if batch:
        yield batch, chars


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


def content_hash(spec: DataConfig, source: Source, recipe: dict[str, Any]) -> str:
    key = {
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


def in_place(store: Store, key: str, size: int, sha256: str) -> bool:
    """The stored object is exactly these bytes (size, then the sha256 the store keeps; a HEAD each on S3)."""
    return store.size(key) == size and store.stored_sha256(key) == sha256


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


# ---------------------------------------------------------------- staging


def default_work_dir(digest: str) -> Path:
    """$LMCTL_CACHE/stage/<hash> (default ~/.cache/lmctl): fixed per hash, so a killed run's leftovers are
    found and cleared by the next one."""
    return cache_root() / "stage" / digest


def load_given_tokenizer(spec: DataConfig, vocab_size: int | None) -> Tokenizer | None:
    if spec.tokenizer == "train":
        return None
    try:
        tok = Tokenizer.load(spec.tokenizer)
    except (ValueError, OSError) as e:  # OSError: a name too long for the filesystem
        raise StageError(f"--tokenizer: {_one_line(e)} (give a tokenizer.json path, or 'train')") from None
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise StageError(
            f"--vocab-size {vocab_size} differs from the {tok.vocab_size} tokens of {spec.tokenizer}: "
            "vocab_size applies only to --tokenizer train; leave it out"
        )
    return tok


def stage(
    spec: DataConfig | dict[str, Any],
    store_uri: str,
    *,
    vocab_size: int | None = None,
    endpoint_url: str | None = None,
    sample_chars: int = DEFAULT_SAMPLE_CHARS,
    batch_chars: int = BATCH_CHARS,
    work_dir: str | Path | None = None,
    progress: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> StageResult:
    """Stage `spec` into `<store_uri>/datasets/<hash>/`; a no-op (reused=True) when already committed.

    Raises StageError for bad input and StoreError for store trouble; nothing is committed then.
    progress: draw a bar on stderr; on_progress(facts): hear it as a dict (StageProgress.report).
    """
    t0 = time.perf_counter()
    spec = spec if isinstance(spec, DataConfig) else DataConfig.model_validate(dict(spec))
    given = load_given_tokenizer(spec, vocab_size)
    if given is None:
        vocab_size = DEFAULT_VOCAB if vocab_size is None else vocab_size
        if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
            raise StageError(
                f"--vocab-size {vocab_size} is out of range: use {MIN_VOCAB} (256 bytes + end-of-text) "
                f"to {MAX_VOCAB}"
            )
    if sample_chars <= 0:
        raise StageError(f"the tokenizer sample must be positive, got {sample_chars} characters")
    store = open_store(store_uri, endpoint_url)
    store.check()
    source = resolve_source(spec)
    recipe = tokenizer_recipe(given, vocab_size or 0, sample_chars)
    digest = content_hash(spec, source, recipe)
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

    uploader: Uploader | None = None
    tokenizer_kept = False
    kept = lambda: _kept(store.url(prefix), tokenizer_kept, uploader)  # noqa: E731 - read at the interrupt
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
        tokenizer_kept = True

        bar.phase("tokenizing", total=spec.max_tokens or source.total_chars)
        on_batch = lambda chars, docs, tokens: bar.update(tokens if spec.max_tokens else chars, docs, tokens)  # noqa: E731
        uploader = Uploader(store, prefix)
        t_tok = time.perf_counter()
        try:
            writer = ShardWriter(
                work,
                eot_id=tok.eot_id,
                vocab_size=tok.vocab_size,
                shard_tokens=spec.shard_tokens,
                val_fraction=spec.val_fraction,
                dataset=source.dataset,
                tokenizer_sha256=tok.sha256,
                revision=source.revision,
                on_shard=lambda path, info, split: uploader.submit(path, info),
            )
            with contextlib.closing(encoded(tok, batches())) as stream:
                documents = pack(writer, stream, spec.max_tokens, on_batch)
            manifest = writer.close()  # cuts the last shards; its local manifest.json is not uploaded
        finally:
            uploader.close()
        t_tok = time.perf_counter() - t_tok
        bar.finish()

        info = {
            "stage_version": STAGE_VERSION,
            "content_hash": digest,
            "spec": spec.model_dump(exclude={"path"}),
            "source": source.identity,
            "tokenizer": recipe,
            "documents": documents,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        store.put_bytes(f"{prefix}/{STAGE_INFO}", json.dumps(info, indent=2).encode())
        store.put_bytes(f"{prefix}/{MANIFEST}", manifest.to_json().encode())  # the commit, last
    uploaded += [*uploader.uploaded, STAGE_INFO, MANIFEST]
    seconds = time.perf_counter() - t0
    return StageResult(
        store.url(prefix), digest, manifest, False, documents, seconds, t_tok, uploaded, uploader.skipped
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


def stage_for_run(spec: Any, record: Any, path: Path, progress: bool = False) -> Any:
    """A run's dataset (spec: RunSpec) staged into its store once; config.yaml then names the staged copy
    (data.path). Warns when the run will see that data more than once. Called by the driver (local runs)
    and by the cloud launch, which stages before renting GPUs; they record data.path in run.json."""
    from model.staged import staged_manifest
    from orchestrator.sanity import warn_epochs

    if spec.data.mixture:
        return _stage_mixture(spec, record, path, progress)
    if spec.data.path:
        warn_epochs(spec, staged_manifest(spec.data.path))  # and still there?
        return spec
    result = _stage_said(spec.data, spec, record, path, progress)
    warn_epochs(spec, result.manifest)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"path": result.dataset_uri})})
    spec.write(path)
    return spec


def _stage_mixture(spec: Any, record: Any, path: Path, progress: bool) -> Any:
    """Each source of data.mixture staged once (reused by any mixture that names it), the first with
    data.tokenizer and the others with the first's tokenizer, so one vocabulary covers them all; config.yaml
    then names every staged copy, and data.path the first's (its tokenizer is the run's)."""
    from model.staged import data_cache_dir, fetch_tokenizer, staged_manifest

    d, tokenizer, sources = spec.data, spec.data.tokenizer, []
    for src in d.mixture:
        if src.path is None:
            one = {"dataset": src.dataset, "subset": src.subset or d.subset, "tokenizer": tokenizer}
            one = d.model_copy(update={**one, "mixture": [], "path": None})
            src = src.model_copy(update={"path": _stage_said(one, spec, record, path, progress).dataset_uri})
        else:
            staged_manifest(src.path)  # and still there?
        sources.append(src)
        if len(sources) == 1:  # the others are staged with the first one's tokenizer
            tokenizer = str(fetch_tokenizer(src.path, data_cache_dir()))
    data = d.model_copy(update={"mixture": sources, "path": sources[0].path})
    spec = spec.model_copy(update={"data": data})
    spec.write(path)
    return spec


def _stage_said(data: DataConfig, spec: Any, record: Any, path: Path, progress: bool) -> StageResult:
    """stage() of one dataset of a run, said in the run's log and reported in staging.json as it goes."""
    from orchestrator.runs import say

    say(f"staging {data.dataset} to {record.store}")
    with StagingReport(path, data.dataset) as report:
        result = stage(
            data, record.store, vocab_size=spec.model.vocab_size, progress=progress, on_progress=report
        )
    done = "reused" if result.reused else "staged"
    say(f"{done} {result.tokens:,} tokens at {result.dataset_uri} ({result.seconds:.1f} s)")
    return result


class StagingReport:
    """on_progress of a run's staging: runs/<name>/staging.json, replaced whole (what `status` and `attach`
    show while the run stages), and a line in the run's log every SAY_EVERY_S (what `logs` shows). The file
    goes when the staging ends, however it ends."""

    SAY_EVERY_S = 30.0

    def __init__(self, path: Path, dataset: str):
        from orchestrator import runs

        self.file, self.dataset, self._said = path / runs.STAGING, dataset, time.monotonic()

    def __call__(self, facts: dict[str, Any]) -> None:
        from orchestrator.progress import human
        from orchestrator.runs import say

        tmp = self.file.with_name(f".{self.file.name}.tmp")
        tmp.write_text(json.dumps({"dataset": self.dataset, **facts, "time": time.time()}))
        tmp.replace(self.file)
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
