"""Where a staging reads documents: a local file or folder, or a hub dataset pinned to a commit, opened
through `datasets` in streaming mode, with its input files as the units of work (`units`, `unit_batches`).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import DataConfig
from model.shards import file_sha256

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".txt": "text", ".parquet": "parquet"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


class StageError(ValueError):
    """Bad input or an unreadable source; the message is one line that says what and what is allowed."""


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Source:
    """Where documents come from: `load_args` for datasets.load_dataset, `identity` for the hash."""

    dataset: str  # what the manifest records: an absolute path or a hub id
    revision: str | None
    identity: dict[str, Any]
    load_args: dict[str, Any]
    total_chars: int | None  # an estimate of the text to read, for the ETA; None when unknown
    file_bytes: int | None = None  # what its local files weigh on disk; None for the hub

    def units(self, n_files: int, unit_bytes: int) -> int:
        """How many units of work its n_files input files form: one per file on the hub (files of hundreds of
        MB), and for local files runs of neighbouring files of about `unit_bytes` each, so a folder of small
        files is not cut into units too small to hold out a validation share of their own."""
        if self.file_bytes is None:
            return n_files
        return max(1, min(n_files, self.file_bytes // unit_bytes))


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
    return Source(str(path), None, identity, load_args, total, sum(f.stat().st_size for f in files))


def hub_source(spec: DataConfig) -> Source:
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
            f"asked about it: {one_line(e)}"
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
    return hub_source(spec)


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
        raise StageError(f"cannot read dataset {source.dataset}: {one_line(e)}") from None
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
        raise StageError(f"cannot read dataset {name}: {one_line(e)}") from None
    if batch:
        yield batch, chars
