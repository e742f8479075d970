"""Packed token shards and the manifest that commits a staged dataset.

A staged dataset is a directory:

    manifest.json        written last: its presence means every shard it lists is in place
    tokenizer.json       the tokenizer that produced the ids
    train_000000.bin     shards: a 32-byte header, then the raw token ids
    val_000000.bin

Documents are packed back to back with the end-of-text id after each one, and cut into shards of
exactly `shard_tokens` tokens (the last shard of a split may be shorter). This module needs only
numpy and pydantic, so the control plane can stage data without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

MAGIC = b"LMCTLTOK"
SHARD_VERSION = 1
MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
HEADER = struct.Struct("<8sIIQ8x")  # magic, format version, dtype code, token count, padding: 32 bytes
DTYPE_CODES = {"uint16": 1, "uint32": 2}
Split = Literal["train", "val"]


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65536 tokens, else uint32."""
    if not 0 < vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size {vocab_size} is out of range: it must be between 1 and 2**32")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _dtype_name(dtype: np.dtype | str | type) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPE_CODES:
        raise ValueError(f"shard dtype {name!r} is not supported: use one of {', '.join(DTYPE_CODES)}")
    return name


# ---------------------------------------------------------------- atomic files


def atomic_write(path: str | Path, chunks: Iterable[bytes]) -> str:
    """Write `chunks` to `path` via tmp + fsync + rename; returns the sha256 of what was written.

    Readers see either the old file or the complete new one, never a partial file.
    """
    path = Path(path)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), shared_mode())  # mkstemp makes 0600
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return digest.hexdigest()


def shared_mode() -> int:
    """0o644 less what this process's umask withholds. Datasets hold no credentials and are readable by
    others where the umask allows it; lmctl's run processes (the CLI's run verbs, the driver, the workers)
    set umask 0o077, so the checkpoints and run state they write through here are the owner's alone."""
    return 0o644 & ~_umask()


def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it, else set and restored."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)  # the only other way to read it: for an instant, the strictest
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- shards


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="file name, relative to the dataset directory")
    tokens: int = Field(ge=0)
    bytes: int = Field(ge=HEADER.size, description="file size, header included")
    sha256: str = Field(description="of the whole file")


def write_shard(path: str | Path, tokens: np.ndarray, dtype: np.dtype | str) -> ShardInfo:
    """Write one shard atomically; ids must fit `dtype`."""
    name = _dtype_name(dtype)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"shard tokens must be a 1-D array, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(name).max):
        raise ValueError(
            f"token ids span [{tokens.min()}, {tokens.max()}], which does not fit {name} "
            f"(0..{np.iinfo(name).max})"
        )
    data = np.ascontiguousarray(tokens, dtype=np.dtype(name).newbyteorder("<"))
    header = HEADER.pack(MAGIC, SHARD_VERSION, DTYPE_CODES[name], data.size)
    sha = atomic_write(path, [header, data.tobytes()])
    return ShardInfo(name=Path(path).name, tokens=data.size, bytes=HEADER.size + data.nbytes, sha256=sha)


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard read-only after checking its header against its size."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"shard {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or not head.startswith(MAGIC):
        raise ValueError(f"{path} is not a token shard (no {MAGIC.decode()} header)")
    _, version, code, count = HEADER.unpack(head)
    if version != SHARD_VERSION:
        raise ValueError(
            f"{path}: shard format version {version} is not supported (this code reads {SHARD_VERSION})"
        )
    names = {c: n for n, c in DTYPE_CODES.items()}
    if code not in names:
        raise ValueError(f"{path}: unknown dtype code {code} in header (known: {sorted(names)})")
    dtype = np.dtype(names[code]).newbyteorder("<")
    expected = HEADER.size + count * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ValueError(f"{path} is {what}: header says {count} tokens = {expected} bytes, file has {size}")
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


# ---------------------------------------------------------------- manifest


class Manifest(BaseModel):
    """What a staged dataset holds; the commit marker of the directory."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = MANIFEST_VERSION
    dataset: str
    revision: str | None = None
    tokenizer_sha256: str
    vocab_size: int = Field(gt=0)
    eot_id: int = Field(ge=0)
    dtype: Literal["uint16", "uint32"]
    shard_tokens: int = Field(gt=0)
    val_fraction: float = Field(ge=0, lt=1)
    train: list[ShardInfo] = []
    val: list[ShardInfo] = []
    train_tokens: int = Field(0, ge=0)
    val_tokens: int = Field(0, ge=0)
    created: str | None = None  # written by stagings before STAGE_VERSION 2; a manifest is now the same bytes
    # wherever and whenever it is staged

    def shards(self, split: Split) -> list[ShardInfo]:
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}: use 'train' or 'val'")
        return self.train if split == "train" else self.val

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest is not valid JSON: {e}") from None
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != MANIFEST_VERSION:
            raise ValueError(
                f"manifest format_version {version!r} is not supported (expected {MANIFEST_VERSION})"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise ValueError(f"invalid manifest: {problems}") from None  # one line: it ends up in a CLI error


def write_manifest(data_dir: str | Path, manifest: Manifest) -> None:
    atomic_write(Path(data_dir) / MANIFEST, [manifest.to_json().encode()])


def read_manifest(data_dir: str | Path) -> Manifest:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"no {MANIFEST} in {data_dir}: the dataset is not staged, or its staging did not finish"
        )
    try:
        return Manifest.from_json(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def verify(data_dir: str | Path, manifest: Manifest, checksums: bool = False) -> None:
    """Check every listed shard exists with its recorded size (and sha256 when asked)."""
    problems = []
    for info in manifest.train + manifest.val:
        path = Path(data_dir) / info.name
        if not path.is_file():
            problems.append(f"{info.name} is missing")
        elif (size := path.stat().st_size) != info.bytes:
            problems.append(f"{info.name} has {size} bytes, manifest says {info.bytes}")
        elif checksums and file_sha256(path) != info.sha256:
            problems.append(f"{info.name} sha256 differs from the manifest")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"dataset {data_dir} does not match its manifest: {'; '.join(problems[:3])}{more}")


# ---------------------------------------------------------------- streaming packer


class ShardWriter:
    """Pack documents into fixed-size shards, routing whole documents to train or val.

    A document goes to val when val holds less than `val_fraction` of the tokens so far, so the
    split is decided while streaming, needs no total upfront, and is a pure function of the
    document sequence. Memory is one shard buffer per split. `on_shard(path, info, split)` runs
    after each shard is written (e.g. to upload it); the manifest is written by `close()` only. `unit` goes
    into the shard names, so the units of a staging can be packed apart and listed together.
    """

    def __init__(
        self,
        out_dir: str | Path,
        eot_id: int,
        vocab_size: int,
        shard_tokens: int,
        val_fraction: float,
        dataset: str,
        tokenizer_sha256: str,
        revision: str | None = None,
        on_shard: Callable[[Path, ShardInfo, Split], None] | None = None,
        unit: str = "",
    ):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0 <= eot_id < vocab_size:
            raise ValueError(f"eot_id {eot_id} is outside the vocabulary [0, {vocab_size})")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST).unlink(missing_ok=True)  # un-commit: the shards are about to change
        self.eot_id, self.vocab_size = eot_id, vocab_size
        self.shard_tokens, self.val_fraction = shard_tokens, val_fraction
        self.dtype = dtype_for_vocab(vocab_size)
        self.on_shard = on_shard
        self.names = (
            f"{{split}}_{unit}_{{n:06d}}.bin" if unit else "{split}_{n:06d}.bin"
        )  # one unit of work's own
        self.manifest = Manifest(
            dataset=dataset,
            revision=revision,
            tokenizer_sha256=tokenizer_sha256,
            vocab_size=vocab_size,
            eot_id=eot_id,
            dtype=self.dtype.name,
            shard_tokens=shard_tokens,
            val_fraction=val_fraction,
        )
        self._buf = {s: np.empty(shard_tokens, self.dtype) for s in ("train", "val")}
        self._fill = {"train": 0, "val": 0}
        self._closed = False

    def add(self, doc_tokens: Sequence[int] | np.ndarray) -> Split:
        """Append one document and its end-of-text token; returns the split it went to."""
        if self._closed:
            raise ValueError("ShardWriter.add called after close()")
        doc = np.asarray(doc_tokens, dtype=np.int64)
        if doc.size and (doc.min() < 0 or doc.max() >= self.vocab_size):
            raise ValueError(f"document has token ids outside the vocabulary [0, {self.vocab_size})")
        m = self.manifest
        split: Split = (
            "val" if m.val_tokens < self.val_fraction * (m.train_tokens + m.val_tokens) else "train"
        )
        self._append(split, doc)
        self._append(split, np.array([self.eot_id]))
        return split

    def _append(self, split: Split, tokens: np.ndarray) -> None:
        buf, pos = self._buf[split], 0
        while pos < tokens.size:
            n = min(tokens.size - pos, self.shard_tokens - self._fill[split])
            buf[self._fill[split] : self._fill[split] + n] = tokens[pos : pos + n]
            self._fill[split] += n
            pos += n
            if self._fill[split] == self.shard_tokens:
                self._flush(split)
        if split == "train":
            self.manifest.train_tokens += tokens.size
        else:
            self.manifest.val_tokens += tokens.size

    def _flush(self, split: Split) -> None:
        n = self._fill[split]
        if n == 0:
            return
        shards = self.manifest.shards(split)
        path = self.out_dir / self.names.format(split=split, n=len(shards))
        info = write_shard(path, self._buf[split][:n], self.dtype)
        shards.append(info)
        self._fill[split] = 0
        if self.on_shard is not None:
            self.on_shard(path, info, split)

    def close(self) -> Manifest:
        """Write the last partial shards, then the manifest (the commit)."""
        if not self._closed:
            self._flush("train")
            self._flush("val")
            self._buf = {}
            write_manifest(self.out_dir, self.manifest)
            self._closed = True
        return self.manifest


# ---------------------------------------------------------------- serial staging


def read_jsonl_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the `text_field` of every line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                present = ", ".join(map(repr, row)) if isinstance(row, dict) else f"a {type(row).__name__}"
                raise ValueError(
                    f"{path}:{lineno}: no field {text_field!r}; fields present: {present or 'none'}"
                )
            text = row[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not a string"
                )
            yield text


def prepare_dataset(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    shard_tokens: int,
    val_fraction: float,
    dataset: str,
    revision: str | None = None,
    max_tokens: int | None = None,
    batch_docs: int = 256,
) -> Manifest:
    """Tokenize `texts` in batches and pack them into `out_dir` (serially; empty texts are skipped).

    Stops after the document that brings the total to `max_tokens` or more, when given.
    """
    out_dir = Path(out_dir)
    writer = ShardWriter(
        out_dir,
        eot_id=tokenizer.eot_id,
        vocab_size=tokenizer.vocab_size,
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        dataset=dataset,
        tokenizer_sha256=tokenizer.sha256,
        revision=revision,
    )
    it = (t for t in texts if t)
    batches = iter(lambda: list(itertools.islice(it, batch_docs)), [])
    for doc in itertools.chain.from_iterable(map(tokenizer.encode_batch, batches)):
        writer.add(doc)
        m = writer.manifest
        if max_tokens is not None and m.train_tokens + m.val_tokens >= max_tokens:
            break
    if writer.manifest.train_tokens == 0:
        raise ValueError(f"dataset {dataset!r} has no text to train on (every document is empty or missing)")
    tokenizer.save(out_dir / TOKENIZER)
    return writer.close()
