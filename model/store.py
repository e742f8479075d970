"""Object stores: one interface over a plain directory (file://) and S3-compatible buckets (s3://).

Both the control plane (staging) and the workers (shard fetch, checkpoints) import this module; it
imports nothing heavy (no torch), and boto3 only when an S3 store is first used.

Keys are "/"-separated names relative to the store's root (`datasets/<hash>/manifest.json`). Every
transfer is verified before it counts: uploads by what the server computed (size and ETag, else the
bytes read back) against the local file, with its sha256 kept as the object's `sha256` metadata;
downloads by size and sha256 into a temporary file that is renamed into place only once it verifies, so
a partial or corrupt download never sits at its destination. Retries,
multipart and concurrency are botocore's and s3transfer's; this module only configures them.

S3 endpoints other than AWS (R2, MinIO, B2, RunPod) come from `endpoint_url` or the standard
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL variables, which boto3 reads itself; credentials likewise
come from boto3's usual chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...) and are
never logged or written by this module.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from model.shards import atomic_write, file_sha256, fsync_dir, shared_mode

URI_FORMS = (
    "s3://bucket/prefix (AWS S3, or R2/MinIO/B2/RunPod with --endpoint-url or AWS_ENDPOINT_URL_S3), "
    "file:///absolute/dir, or a local directory path"
)
SHA_META = "sha256"  # user metadata key: x-amz-meta-sha256
MAX_ATTEMPTS = 8  # botocore standard mode: 5xx, throttling, resets and timeouts, with backoff
CHECK_ATTEMPTS = 2  # check() fails fast on a dead endpoint instead of backing off for a minute
VERIFY_ATTEMPTS = 2  # an upload the store reports back with another size or sha256 (torn) is sent again
# S3's answers to a body that did not arrive whole: 4xx, so botocore does not retry them; uploads send again
_TORN_CODES = {"BadDigest", "InvalidDigest", "IncompleteBody", "EntityTooSmall", "XAmzContentSHA256Mismatch"}
CONNECT_TIMEOUT = 3
READ_TIMEOUT = 60
MB = 1 << 20
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_CREDENTIALS_FIX = "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"


def cache_root() -> Path:
    """Local copies of what lives in stores (datasets, checkpoints, staging work): $LMCTL_CACHE, default
    ~/.cache/lmctl. One machine-wide place, so every run and restart on the machine reuses them."""
    return Path(os.environ.get("LMCTL_CACHE") or Path.home() / ".cache" / "lmctl")


class StoreError(RuntimeError):
    """A store operation failed; the message says what, where, and how to fix it (never a secret)."""


def check_key(key: str, what: str = "key") -> str:
    """Keys and prefixes are relative '/'-separated names: no '..' can climb out of the store's root."""
    if not isinstance(key, str) or not key:
        raise StoreError(f"empty {what}: use a '/'-separated relative name such as 'datasets/abc/x.bin'")
    if not key.isprintable() or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise StoreError(
            f"invalid {what} {key!r}: use a '/'-separated relative name with no leading '/', "
            "no empty, '.' or '..' segments, and no NUL or other control characters"
        )
    return key


def open_store(uri: str, endpoint_url: str | None = None) -> Store:
    """The store a URI names; `endpoint_url` applies to s3:// only (a file store ignores it)."""
    if not isinstance(uri, str) or not uri.strip() or "\0" in uri:
        raise StoreError(f"invalid store URI {uri!r}: use {URI_FORMS}")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise StoreError(
                f"invalid bucket name {bucket!r} in {uri!r}: 3-63 characters of a-z, 0-9, '.' and '-', "
                "starting and ending with a letter or digit"
            )
        if prefix := prefix.rstrip("/"):
            check_key(prefix, f"prefix in {uri!r}")
        return S3Store(bucket, prefix, endpoint_url)
    if uri.startswith("file://"):
        path = uri[len("file://") :]
        path = path.rstrip("/") or path  # "file:///" is the root folder; "file://" names none
        if not path.startswith("/"):
            raise StoreError(f"invalid file URI {uri!r}: it needs an absolute path, e.g. file:///data/lmctl")
        if path != "/":
            check_key(path[1:], f"path in {uri!r}")
        return FileStore(Path(path))
    if re.match(r"(s3|file):(?!//)", uri, re.IGNORECASE):  # a mistyped URI, not a folder named 's3:'
        raise StoreError(f"invalid store URI {uri!r}: did you mean s3://... or file:///...? Use {URI_FORMS}")
    if "://" in uri:
        raise StoreError(f"unsupported store URI {uri!r}: use {URI_FORMS}")
    try:
        path = Path(uri).expanduser().resolve()
    except RuntimeError as e:  # '~name' of no such user, a symlink loop
        raise StoreError(f"invalid store path {uri!r}: {e}; use {URI_FORMS}") from None
    return open_store(f"file://{path}")  # held to its file:// URI's rules: that URI is printed and reopened


class Store:
    """What every backend offers; keys are relative to `uri`."""

    uri: str

    def url(self, key: str) -> str:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        raise NotImplementedError

    def stored_sha256(self, key: str) -> str | None:
        """sha256 of an object without downloading it (None if missing or unrecorded): lets staging skip
        what is already in place."""
        raise NotImplementedError

    def put_file(self, local: Path, key: str, sha256: str | None = None) -> None:
        raise NotImplementedError

    def get_file(self, key: str, local: Path, sha256: str | None = None) -> None:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Keys under the folder `prefix` ('' = everything), sorted."""
        return sorted(self.list_sizes(prefix))

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: size in bytes} under the folder `prefix`: one listing, no request per object."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove a key; removing a missing key is not an error (as on S3)."""
        raise NotImplementedError

    def remove_empty(self, prefix: str) -> None:
        """Drop the folder `prefix` once its objects are deleted: object stores have no folders."""

    def check(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# ---------------------------------------------------------------- verified landing


def _local_size(local: Path) -> int:
    try:
        return local.stat().st_size
    except FileNotFoundError:
        raise StoreError(f"local file {local} does not exist") from None


def _land(tmp: Path, dest: Path, size: int | None, sha256: str | None, source: str) -> None:
    """Rename a fully written tmp file to `dest` only if its size and sha256 are what they must be."""
    got = tmp.stat().st_size
    if size is not None and got != size:
        raise StoreError(f"{source}: copied {got} bytes, expected {size} (truncated or changed during copy)")
    if sha256 is not None and (actual := file_sha256(tmp)) != sha256:
        raise StoreError(
            f"{source} is corrupt: sha256 {actual[:12]}... differs from the expected {sha256[:12]}..."
        )
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows it
        fsync_dir(dest.parent)


def os_error_text(e: OSError) -> str:
    """'No space left on device (ENOSPC)': what a full disk, a quota or a file size limit says."""
    return f"{e.strerror or e} ({errno.errorcode.get(e.errno or 0, e.errno)})"


@contextlib.contextmanager
def _tmp_next_to(dest: Path, source: str) -> Iterator[Path]:
    """A fresh tmp path in dest's folder (same filesystem: the final rename is atomic); removed on error.

    A local OSError on the way (a full disk, a quota, a file size limit: s3transfer and shutil raise it
    without a file name) becomes a StoreError naming `dest` and the `source` being copied."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(name, shared_mode())  # mkstemp makes 0600; run processes' umask keeps checkpoints private
        tmp = Path(name)
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise StoreError(f"cannot write {dest} (copy of {source}): {os_error_text(e)}") from None


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


# ---------------------------------------------------------------- file://


class FileStore(Store):
    """A plain directory: the default for local runs and what tests use where no bucket is needed."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def url(self, key: str) -> str:
        return f"file://{self._path(key)}"

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def stored_sha256(self, key: str) -> str | None:
        """Hashed in place: a local read is as cheap as any metadata would be, and cannot go stale."""
        path = self._path(key)
        return file_sha256(path) if path.is_file() else None

    def put_file(self, local: Path, key: str, sha256: str | None = None) -> None:
        """Atomic copy, then re-hash the copy when a sha256 is given (size only otherwise)."""
        self._copy(Path(local), self._path(key), sha256, f"upload of {local} to {self.url(key)}")

    def get_file(self, key: str, local: Path, sha256: str | None = None) -> None:
        src = self._path(key)
        if not src.is_file():
            raise StoreError(f"{self.url(key)} does not exist")
        self._copy(src, Path(local), sha256, self.url(key))

    @staticmethod
    def _copy(src: Path, dest: Path, sha256: str | None, source: str) -> None:
        size = _local_size(src)
        with _tmp_next_to(dest, source) as tmp:
            shutil.copyfile(src, tmp)
            _land(tmp, dest, size, sha256, source)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, [data])

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise StoreError(f"{self.url(key)} does not exist") from None

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        prefix = prefix.rstrip("/")
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return {}
        sizes = {}
        for p in base.rglob("*"):
            if p.is_file() and not _is_tmp(p.name):
                with contextlib.suppress(FileNotFoundError):  # deleted since the folder was read
                    sizes[p.relative_to(self.root).as_posix()] = p.stat().st_size
        return sizes

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def remove_empty(self, prefix: str) -> None:
        """Remove the folder `prefix` and the folders under it that hold no object any more (temp files of
        interrupted copies do not count), as S3 forgets a prefix with its last object: deleted checkpoints
        and runs leave no empty folders behind. A folder that still holds an object stays."""
        base = self._path(prefix.rstrip("/"))
        if base.is_symlink() or not base.is_dir():
            return
        for folder, _, files in os.walk(base, topdown=False):  # symlinked folders are not entered
            for name in filter(_is_tmp, files):
                Path(folder, name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: it holds an object
                os.rmdir(folder)

    def check(self) -> None:
        """The root must be a writable directory, or creatable: the nearest existing ancestor writable."""
        try:
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"store root {self.root} exists but is not a directory")
            existing = next(p for p in (self.root, *self.root.parents) if p.exists())
        except OSError as e:  # a name longer than the filesystem allows
            raise StoreError(f"store root {self.root} cannot be used: {e}") from None
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StoreError(f"store root {self.root} is not writable ({existing} denies write access)")


# ---------------------------------------------------------------- s3://


def _digests(path: Path, size: int, part_size: int | None) -> tuple[str, str]:
    """(sha256, S3 ETag) of a file in one pass: the ETag is the MD5 of a single PUT's body, or for a
    multipart upload the MD5 of its parts' MD5s, "-<parts>"."""
    from concurrent.futures import ThreadPoolExecutor

    md5 = lambda data: hashlib.md5(data, usedforsecurity=False).digest()  # noqa: E731
    sha, parts, block = hashlib.sha256(), [], part_size or max(size, 1)
    # Both hashes release the GIL: the parts' MD5s run beside the SHA-256, three parts in memory at most
    with open(path, "rb") as f, ThreadPoolExecutor(2) as pool:
        for _ in range(max(1, -(-size // block))):  # an empty file is one empty PUT
            part = f.read(block)
            parts.append(pool.submit(md5, part))
            sha.update(part)
            if len(parts) > 2:
                parts[-3].result()
    digests = [p.result() for p in parts]
    if part_size is None:
        return sha.hexdigest(), digests[0].hex()
    return sha.hexdigest(), f"{md5(b''.join(digests)).hex()}-{len(parts)}"


class _HashSink:
    """A write-only file for download_fileobj that keeps only the sha256 of what it is sent."""

    def __init__(self):
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return len(data)


def _arrived_torn(e: BaseException) -> bool:
    """Whether S3 rejected an upload because its body did not arrive whole (boto3 wraps the ClientError of
    a failed upload_file in S3UploadFailedError)."""
    from botocore.exceptions import ClientError

    cause = e if isinstance(e, ClientError) else e.__context__
    return isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in _TORN_CODES


class S3Store(Store):
    """A bucket and prefix on any S3-compatible endpoint, through one lazily made boto3 client."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, transfer: Any = None):
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix.strip("/"), endpoint_url
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.transfer = transfer  # a boto3 TransferConfig; None = _config()'s default
        self._client: Any = None
        self._lock = threading.Lock()

    def _make_client(self, attempts: int) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": attempts},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_pool_connections=32,  # several files at once, each with max_concurrency parts in flight
            # botocore >= 1.36 sends CRC32 trailers (aws-chunked) on every upload and checks them on
            # downloads; R2, B2 and older MinIO refuse those. Ours are verified end to end (_landed_whole).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
        except ValueError as e:  # a malformed endpoint, from the argument or AWS_ENDPOINT_URL(_S3)
            raise StoreError(f"invalid S3 endpoint for {self.uri}: {e}; use http(s)://host[:port]") from None

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client(MAX_ATTEMPTS)
            return self._client

    @property
    def endpoint(self) -> str:
        return self.endpoint_url or self.client.meta.endpoint_url

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _config(self) -> Any:
        """The transfer config; by default multipart above 32 MB in 16 MB parts, 8 parts in flight:
        saturates a pod's link, bounds memory."""
        if self.transfer is None:
            from boto3.s3.transfer import TransferConfig

            self.transfer = TransferConfig(
                multipart_threshold=32 * MB, multipart_chunksize=16 * MB, max_concurrency=8, use_threads=True
            )
        return self.transfer

    def _head(self, key: str) -> dict | None:
        """HEAD of an object, None when it does not exist."""
        from botocore.exceptions import ClientError

        with self._errors("HEAD", key):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else head["ContentLength"]

    def stored_sha256(self, key: str) -> str | None:
        """The `sha256` metadata that put_file and put_bytes record (one HEAD)."""
        head = self._head(key)
        return None if head is None else head.get("Metadata", {}).get(SHA_META)

    def put_file(self, local: Path, key: str, sha256: str | None = None) -> None:
        """Upload (multipart and concurrent above the threshold), then check it landed whole (_landed_whole:
        size and ETag, else a read-back); an upload that lands torn or altered is sent again (VERIFY_ATTEMPTS
        in all), then it is an error.

        The local file is hashed first, so a file that changed since the caller hashed it is caught
        here instead of being recorded under a wrong checksum.
        """
        local = Path(local)
        size = _local_size(local)
        actual, etag = _digests(local, size, self._part_size(size))
        if sha256 is not None and actual != sha256:
            raise StoreError(
                f"local file {local} has sha256 {actual[:12]}..., expected {sha256[:12]}...: it changed "
                "after it was hashed; nothing was uploaded"
            )
        send = lambda: self.client.upload_file(  # noqa: E731
            str(local),
            self.bucket,
            self._key(key),
            ExtraArgs={"Metadata": {SHA_META: actual}},
            Config=self._config(),
        )
        what = f"upload of {local} to {self.url(key)}"
        self._send_verified(key, send, size, actual, etag, "upload to", what)

    def get_file(self, key: str, local: Path, sha256: str | None = None) -> None:
        """Download to a tmp file next to `local`; verify size and sha256 (given, else metadata); rename."""
        local = Path(local)
        head = self._head(key)
        if head is None:
            self._raise_missing(key)
        expected = sha256 or head.get("Metadata", {}).get(SHA_META)
        with _tmp_next_to(local, self.url(key)) as tmp:
            with self._errors("download of", key):
                self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self._config())
            _land(tmp, local, head["ContentLength"], expected, self.url(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        """One PUT: S3 makes it visible all at once, so small markers are atomic. Then a HEAD checks that
        it landed whole (size and ETag), as put_file does: a torn COMMIT must not pass for a written one."""
        digest, etag = hashlib.sha256(data).hexdigest(), hashlib.md5(data, usedforsecurity=False).hexdigest()
        send = lambda: self.client.put_object(  # noqa: E731
            Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={SHA_META: digest}
        )
        self._send_verified(key, send, len(data), digest, etag, "PUT of", f"PUT of {self.url(key)}")

    def _part_size(self, size: int) -> int | None:
        """The part size upload_file will cut `size` bytes into (as s3transfer adjusts it); None: one PUT."""
        from s3transfer.utils import ChunksizeAdjuster

        config = self._config()
        if size < config.multipart_threshold:
            return None
        return ChunksizeAdjuster().adjust_chunksize(config.multipart_chunksize, size)

    def _send_verified(
        self, key: str, send: Callable[[], Any], size: int, sha256: str, etag: str, action: str, what: str
    ) -> None:
        """send() the object, then check that it landed whole (_landed_whole). A body that arrived torn
        (S3 refused it, or it landed short or altered) is sent again, VERIFY_ATTEMPTS in all."""
        got = None
        for attempt in range(1, VERIFY_ATTEMPTS + 1):
            with self._errors(action, key):
                try:
                    send()
                except Exception as e:
                    if attempt < VERIFY_ATTEMPTS and _arrived_torn(e):
                        continue
                    raise
            head = self._head(key)
            got = None if head is None else (head["ContentLength"], head.get("ETag", "").strip('"'))
            if head is not None and self._landed_whole(key, head, size, sha256, etag):
                return
        raise StoreError(
            f"{what} did not verify ({VERIFY_ATTEMPTS} attempts): the store reports (size, ETag) {got}, "
            f"expected {(size, etag)} and sha256 {sha256}"
        )

    def _landed_whole(self, key: str, head: dict, size: int, sha256: str, etag: str) -> bool:
        """Whether the stored object is the one sent, by what the server computed, not only by the metadata
        we sent along: its ETag (the MD5 of the body, or of its parts' MD5s) where the service computes it
        so; else (SSE-KMS, a service with other ETags) its bytes, read back and hashed."""
        if head["ContentLength"] != size or head.get("Metadata", {}).get(SHA_META) != sha256:
            return False
        if head.get("ETag", "").strip('"') == etag:
            return True
        digest = _HashSink()
        with self._errors("read-back of", key):
            self.client.download_fileobj(self.bucket, self._key(key), digest, Config=self._config())
        return digest.sha256.hexdigest() == sha256

    def get_bytes(self, key: str) -> bytes:
        """Through the transfer manager, which retries a body cut mid-stream (a plain GET would not)."""
        buf = io.BytesIO()
        from botocore.exceptions import ClientError

        with self._errors("download of", key):
            try:
                self.client.download_fileobj(self.bucket, self._key(key), buf, Config=self._config())
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    self._raise_missing(key)
                raise
        return buf.getvalue()

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        root, prefix = (f"{self.prefix}/" if self.prefix else ""), prefix.rstrip("/")
        full = f"{self._key(prefix)}/" if prefix else root
        sizes = {}
        with self._errors("listing of", prefix or None):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                sizes.update({obj["Key"][len(root) :]: obj["Size"] for obj in page.get("Contents", [])})
        return sizes

    def delete(self, key: str) -> None:
        with self._errors("delete of", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def check(self) -> None:
        """One LIST of at most one key: it needs the endpoint, valid credentials, the bucket and
        s3:ListBucket, and unlike HEAD its error body says which of them is wrong."""
        probe = self._make_client(CHECK_ATTEMPTS)
        with self._errors("access check of", None):
            probe.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    def _raise_missing(self, key: str) -> None:
        """A 404 on an object: say whether the object or the whole bucket is missing (one more request)."""
        with self._errors("HEAD of bucket for", key):
            self.client.head_bucket(Bucket=self.bucket)
        raise StoreError(f"{self.url(key)} does not exist")

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        """Turn botocore's exceptions into one StoreError line that names the URI, endpoint and fix."""
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        what = self.url(key) if key else self.uri
        try:
            yield
        except S3UploadFailedError as e:  # boto3 wraps the ClientError of a failed upload
            cause = e.__context__
            if isinstance(cause, ClientError):
                raise StoreError(self._client_error(cause, action, what)) from None
            raise StoreError(f"S3 {action} {what} failed at {self.endpoint}: {e}") from None
        except ClientError as e:
            raise StoreError(self._client_error(e, action, what)) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise StoreError(f"no usable S3 credentials for {self.uri}: {_CREDENTIALS_FIX}") from None
        except (EndpointConnectionError, ConnectTimeoutError):
            raise StoreError(
                f"cannot reach the S3 endpoint {self.endpoint} ({action} {what}): check the endpoint "
                "(--endpoint-url, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) and the network"
            ) from None
        except (BotoCoreError, RetriesExceededError) as e:
            raise StoreError(
                f"S3 {action} {what} failed at {self.endpoint} after retries: {type(e).__name__}: {e}"
            ) from None

    def _client_error(self, e: Any, action: str, what: str) -> str:
        err = e.response.get("Error", {})
        code = err.get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        where = f"{self.endpoint} ({self.uri})"
        if code == "InvalidAccessKeyId":
            return f"{where} does not know the access key id (InvalidAccessKeyId): {_CREDENTIALS_FIX} for it"
        if code == "SignatureDoesNotMatch":
            return f"{where}: wrong secret key for the key id (SignatureDoesNotMatch); {_CREDENTIALS_FIX}"
        if code in ("InvalidToken", "ExpiredToken"):
            return f"{where} rejected the session token ({code}): refresh AWS_SESSION_TOKEN or unset it"
        if code == "NoSuchBucket" or (code == "404" and action.startswith("HEAD of bucket")):
            return f"bucket {self.bucket!r} does not exist at {self.endpoint}: create it or fix {self.uri}"
        if code == "AccessDenied" or status == 403:
            why = "are wrong or lack" if code == "403" else "lack"  # a HEAD's 403 has no body to tell which
            return (
                f"access denied: {action} {what} at {self.endpoint}: the credentials {why} permission on "
                f"bucket {self.bucket!r} (needs s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject)"
            )
        if code in ("NoSuchKey", "404") or status == 404:
            return f"{what} does not exist"
        message = str(err.get("Message", ""))[:200]
        return f"S3 {action} {what} failed at {self.endpoint}: {code or status} {message}".rstrip()
