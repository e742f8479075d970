"""Canary secrets: set fake credentials, run every lmctl verb, then look for them in everything it wrote.

    sweep(paths, canaries) -> [(file, canary name)]    every file under `paths`, binary ones included
    exercise(base) -> Exercise                           every verb through the CLI, then the whole sweep

A canary is looked for in the forms a leak could take: the raw bytes, URL-encoded, base64 (at any
alignment, standard and URL-safe), hex, UTF-16, and each long alphanumeric run of it on its own (which
survives JSON, shell or YAML escaping of the characters between runs). Containers are opened: zip
members (torch's .pt files are zip archives), gzip streams, PNG text chunks, and wandb's offline
.wandb logs (records cut into 32 KiB blocks, so a string may straddle a block header).

`exercise` is what tests/test_secrets.py asserts on and what a benchmark can call to report how much was
scanned and how many leaks were found (`Exercise.summary()`); `python tests/canary.py` prints that summary.
It needs a loopback S3 endpoint (moto, tests/s3.py) and about a minute on 2 cores: one local Ray run of
20 steps and every other verb once.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# Shaped like the real things (an AWS key id is AKIA + 16, a secret 40 characters with '/' and '+', a
# wandb key 40 hex digits, an HF token hf_ + 34), so nothing rejects them for their form.
CANARIES = {
    "WANDB_API_KEY": "c0ffee5eca11ab1ecanary0123456789abcdef7",
    "AWS_ACCESS_KEY_ID": "AKIACANARYQ7Z2XK4WLP",
    "AWS_SECRET_ACCESS_KEY": "CanarySecret/9b7e2aQx4LmZp0+Rt8VwYk3Hn6Jd",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzCanarySessionTok/55e1d3+QzXwVuTsRpOnMlKj==",
    "HF_TOKEN": "hf_CanaryHubToken8c3a61QzXwVuTsRpOnMl",
}
REFUSED = ("resume-finished", "resume-cloud")  # verbs of exercise() that must exit 2; every other one 0
MIN_FRAGMENT = 12  # alphanumeric runs at least this long are looked for on their own
_CHUNK = 8 << 20
_WANDB_BLOCK, _WANDB_HEADER = 32768, 7


# ---------------------------------------------------------------- what a leak looks like


def needles(value: str) -> list[bytes]:
    """The byte strings whose presence means `value` leaked, in any of the forms above."""
    from urllib.parse import quote

    raw = value.encode()
    out = {raw, quote(value, safe="").encode(), raw.hex().encode(), value.encode("utf-16-le")}
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        for shift in range(3):  # the secret may start at any byte offset of an encoded blob
            text = enc(b"\0" * shift + raw).rstrip(b"=")
            first = -(-8 * shift // 6)  # the first character that depends on the secret alone
            last = 8 * (shift + len(raw)) // 6  # one past the last such character
            out.add(text[first:last])
    run = ""
    for ch in value + "\0":
        if ch.isalnum():
            run += ch
            continue
        if len(run) >= MIN_FRAGMENT:
            out.add(run.encode())
        run = ""
    return sorted((n for n in out if len(n) >= MIN_FRAGMENT), key=len, reverse=True)


@dataclass
class Scanner:
    """Accumulates what was scanned and what was found; `leaks` are (where, canary name) pairs."""

    canaries: dict[str, str] = field(default_factory=lambda: dict(CANARIES))
    files: int = 0
    bytes: int = 0  # bytes of files, outputs and objects as they are
    expanded: int = 0  # bytes of container members and reassembled records, scanned besides
    outputs: int = 0  # command outputs (stdout, stderr) and other in-memory texts
    objects: int = 0  # store objects
    skipped: list[str] = field(default_factory=list)  # links, sockets, fifos: nothing to read
    leaks: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._needles = {name: needles(value) for name, value in self.canaries.items()}
        self._overlap = max(len(n) for ns in self._needles.values() for n in ns)

    def find(self, data: bytes) -> list[str]:
        """Names of the canaries in `data`, in any of their forms."""
        return [name for name, ns in self._needles.items() if any(n in data for n in ns)]

    def _record(self, where: str, data: bytes) -> None:
        for name in self.find(data):
            if (where, name) not in self.leaks:
                self.leaks.append((where, name))

    def scan_bytes(self, where: str, data: bytes, kind: str | None = "outputs") -> None:
        """An in-memory text or object (a command's output, a store object); `kind` is what it counts as."""
        if kind:
            setattr(self, kind, getattr(self, kind) + 1)
        self.bytes += len(data)
        self._record(where, data)
        self._expand(where, data)

    def scan_file(self, path: Path) -> None:
        self.files += 1
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size <= 4 * _CHUNK:
                data = f.read()
                self.bytes += len(data)
                self._record(str(path), data)
                self._expand(str(path), data)
                return
            tail = b""
            while chunk := f.read(_CHUNK):  # big files: streamed, each chunk with the previous one's tail
                self.bytes += len(chunk)
                self._record(str(path), tail + chunk)
                tail = chunk[-self._overlap :]
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    self._members(str(path), z)

    def scan_tree(self, root: Path, skip: Iterable[Path] = ()) -> None:
        """Every regular file under `root` (or `root` itself), following no links, except under `skip`."""
        root, skip = Path(root), {str(Path(p)) for p in skip}
        if root.is_symlink() or not root.exists():
            return
        if root.is_file():
            self.scan_file(root)
            return
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
            for name in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
                path = Path(folder, name)
                mode = path.lstat().st_mode
                if stat.S_ISREG(mode):
                    self.scan_file(path)
                else:
                    self.skipped.append(str(path))

    # -------------------------------------------------------- containers

    def _expand(self, where: str, data: bytes) -> None:
        try:
            if data[:4] == b"PK\x03\x04":
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    self._members(where, z)
            elif data[:2] == b"\x1f\x8b":
                self._inner(f"{where}!gunzip", gzip.decompress(data))
            elif data[:8] == b"\x89PNG\r\n\x1a\n":
                for i, text in enumerate(_png_texts(data)):
                    self._inner(f"{where}!text{i}", text)
            elif data[:4] == b":W&B":
                self._inner(f"{where}!records", _wandb_payload(data))
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, struct.error, ValueError):
            pass  # not what its first bytes claimed: the raw bytes were scanned all the same

    def _members(self, where: str, z: zipfile.ZipFile) -> None:
        for info in z.infolist():
            if not info.is_dir():
                self._inner(f"{where}!{info.filename}", _member(z, info))

    def _inner(self, where: str, data: bytes) -> None:
        self.expanded += len(data)
        self._record(where, data)
        self._expand(where, data)


def _member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A zip member's bytes, read from its local header on: zipfile's own read checks a CRC-32, which
    torch.save leaves out when asked to (model/checkpoint.py does)."""
    f = z.fp
    f.seek(info.header_offset)
    header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    data = f.read(info.compress_size)
    if info.compress_type == zipfile.ZIP_STORED:
        return data
    if info.compress_type == zipfile.ZIP_DEFLATED:
        return zlib.decompressobj(-15).decompress(data)
    return z.read(info)  # bzip2, lzma: zipfile knows how


def _png_texts(data: bytes) -> Iterator[bytes]:
    """The text chunks of a PNG (tEXt as is; zTXt and compressed iTXt inflated)."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"tEXt":
            yield body
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            yield key + b"\0" + zlib.decompress(rest[1:])
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            yield key + b"\0" + (zlib.decompress(text) if compressed else text)
        elif kind == b"IEND":
            return


def _wandb_payload(data: bytes) -> bytes:
    """The record payloads of a .wandb log joined up: a 7-byte file header, then records of a 7-byte header
    (crc32, little-endian u16 length, type) and data, in 32 KiB blocks that a record never straddles
    (a long one is cut into fragments); fewer than 7 bytes left in a block are padding."""
    out, pos = [], _WANDB_HEADER
    while pos + _WANDB_HEADER <= len(data):
        left = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left < _WANDB_HEADER:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:
            break  # zeroes: the end of what was written
        out.append(data[pos + 7 : pos + 7 + length])
        pos += _WANDB_HEADER + length
    return b"".join(out)


def sweep(paths: Iterable[str | Path], canaries: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(file, canary name) for every canary found in any file under `paths`."""
    scanner = Scanner(dict(canaries or CANARIES))
    for p in paths:
        scanner.scan_tree(Path(p))
    return scanner.leaks


# ---------------------------------------------------------------- permissions


def group_or_other(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(path, mode) of every file or folder under `paths` that grants its group or others anything."""
    found = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            continue
        for path in [root, *sorted(root.rglob("*"))]:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                found.append((str(path), oct(stat.S_IMODE(mode))))
    return found


def writable_by_others(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(path, mode) of every file or folder under `paths` that its group or others may write."""
    return [(p, m) for p, m in group_or_other(paths) if int(m, 8) & 0o022]


# ---------------------------------------------------------------- every verb


@dataclass
class Command:
    label: str
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Exercise:
    """What exercise() ran and found. `base` holds runs/, cache/, home/, hf/ (the export) and plain/ (the
    `lmctl train` run) for further checks."""

    base: Path
    env: dict[str, str]
    bucket: str
    commands: dict[str, Command]
    scanner: Scanner
    processes: int = 0  # the run's processes whose command line was read while it ran
    areas: dict[str, dict[str, int]] = field(default_factory=dict)  # what was scanned where: files, bytes
    cmdline_leaks: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def leaks(self) -> list[tuple[str, str]]:
        return self.scanner.leaks + self.cmdline_leaks

    @property
    def unexpected(self) -> list[str]:
        """Verbs whose exit code was not the expected one: a sweep after a failed verb proves less."""
        return [c.label for c in self.commands.values() if c.returncode != (2 if c.label in REFUSED else 0)]

    def summary(self) -> dict[str, Any]:
        s = self.scanner
        return {
            "verbs": sorted(self.commands),
            "verbs_not_as_expected": self.unexpected,
            "canaries": sorted(s.canaries),
            "files_scanned": s.files,
            "bytes_scanned": s.bytes,
            "expanded_bytes_scanned": s.expanded,
            "outputs_scanned": s.outputs,
            "store_objects_scanned": s.objects,
            "process_cmdlines_read": self.processes,
            "areas": self.areas,
            "canary_leaks": len(self.leaks),
            "leaks": [list(x) for x in self.leaks],
            "seconds": round(self.seconds, 1),
        }


def lab_env(base: Path, tmp: Path, endpoint: str, canaries: dict[str, str]) -> dict[str, str]:
    """The environment of every command: canaries as the real credentials, an isolated HOME, TMPDIR (Ray's
    session folder goes there), runs folder and cache, the loopback S3 endpoint, no network needed."""
    drop = ("LMCTL_", "WANDB_", "AWS_", "HF_", "HUGGING", "SKYPILOT_", "RAY_", "XDG_", "MPLCONFIGDIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(canaries)
    env.update(
        HOME=str(base / "home"),
        TMPDIR=str(tmp),
        LMCTL_RUNS_DIR=str(base / "runs"),
        LMCTL_CACHE=str(base / "cache"),
        WANDB_MODE="offline",
        AWS_ENDPOINT_URL=endpoint,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(base / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(base / "no-aws-config"),
        AWS_EC2_METADATA_DISABLED="true",
        HF_HUB_OFFLINE="1",
        SKYPILOT_DISABLE_LOCAL_API_SERVER="1",  # a SkyPilot SDK call fails instead of starting a server
        COLUMNS="400",  # rich wraps nothing: a printed secret would be one piece
        PYTHONDONTWRITEBYTECODE="1",
    )
    (base / "home").mkdir(parents=True, exist_ok=True)
    return env


def exercise(
    base: str | Path,
    endpoint: str | None = None,
    canaries: dict[str, str] | None = None,
    umask: int = 0o000,
    timeout: float = 300,
) -> Exercise:
    """Run every verb with canary credentials under `base`, then sweep everything they wrote.

    The caller's umask is `umask` (default 0o000, the most permissive): whatever is owner-only afterwards,
    lmctl made so. Verbs: --help; presets; train (2 steps, no Ray); stage (into a bucket on `endpoint`,
    moto started here when None); launch --print-config; plan; launch --gpu --dry-run (cloud); launch
    --mode local --foreground --wandb (20 steps; its data and checkpoints in the bucket); status (table,
    all as JSON, one run as JSON); logs; attach; plot; generate; export --hf; stop and resume of the
    finished run (both refuse); resume of the cloud run (stages, then SkyPilot is unreachable: refused).
    While the local run trains, each of its processes' command lines is read.
    """
    t0 = time.monotonic()
    base = Path(base)
    canaries = dict(canaries or CANARIES)
    server = None
    if str(Path(__file__).resolve().parent) not in sys.path:  # tests/s3.py, for a caller outside pytest
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    if endpoint is None:
        from s3 import start_moto

        server, endpoint = start_moto()
    from s3 import make_bucket

    bucket = make_bucket(endpoint, prefix="lm")
    # Ray's unix sockets live under TMPDIR and their paths may not exceed 107 bytes: a short folder.
    tmp = Path(tempfile.mkdtemp(prefix="lmctl-canary-", dir="/tmp"))
    env = lab_env(base, tmp, endpoint, canaries)
    scanner = Scanner(canaries)
    ex = Exercise(base, env, bucket.uri, {}, scanner)
    try:
        _verbs(ex, umask, timeout)
        ex.areas["outputs"] = {"files": 0, "outputs": scanner.outputs, "bytes": scanner.bytes}
        sessions = sorted((tmp / "ray").glob("session_2*"))
        for area, scan in (
            ("runs", lambda: scanner.scan_tree(base / "runs")),
            ("cache", lambda: scanner.scan_tree(base / "cache")),
            ("home", lambda: scanner.scan_tree(base / "home")),
            ("export", lambda: scanner.scan_tree(base / "hf")),
            ("plain_run", lambda: scanner.scan_tree(base / "plain")),
            ("ray_sessions", lambda: [scanner.scan_tree(s) for s in sessions]),
            ("tmp", lambda: scanner.scan_tree(tmp, skip=sessions)),  # anything else put there
            ("bucket", lambda: _scan_bucket(scanner, endpoint, bucket.bucket)),
        ):
            files, size, objects = scanner.files, scanner.bytes, scanner.objects
            scan()
            ex.areas[area] = {"files": scanner.files - files, "bytes": scanner.bytes - size}
            if area == "bucket":
                ex.areas[area]["objects"] = scanner.objects - objects
        scanner.scan_tree(base, skip=[base / a for a in ("runs", "cache", "home", "hf", "plain")])  # the rest
    finally:
        _reap(base / "runs")
        shutil.rmtree(tmp, ignore_errors=True)
        if server is not None:
            server.stop()
    ex.seconds = time.monotonic() - t0
    return ex


def _verbs(ex: Exercise, umask: int, timeout: float) -> None:
    from orchestrator import runs

    def cli(label: str, *args: str, limit: float = timeout) -> Command:
        t = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *args],
            env=ex.env,
            cwd=REPO,
            capture_output=True,
            timeout=limit,
            umask=umask,
        )
        cmd = Command(
            label, list(args), out.returncode, out.stdout.decode(errors="replace"),
            out.stderr.decode(errors="replace"), time.monotonic() - t,
        )  # fmt: skip
        ex.commands[label] = cmd
        ex.scanner.scan_bytes(f"{label}: stdout", out.stdout)
        ex.scanner.scan_bytes(f"{label}: stderr", out.stderr)
        return cmd

    cli("help", "--help")
    cli("presets", "presets", "--json")
    plain = ["train.steps=2", "train.checkpoint_every=2", "train.eval_every=2"]
    cli("train", "train", "--config", "tiny", "--run-dir", str(ex.base / "plain"),
        *[a for o in plain for a in ("--override", o)])  # fmt: skip
    staged = cli("stage", "stage", "--dataset", "configs/data/shakespeare.jsonl", "--vocab-size", "2048",
                 "--store", ex.bucket, "--json")  # fmt: skip
    data = json.loads(staged.stdout)["dataset_uri"] if staged.returncode == 0 else f"{ex.bucket}/missing"
    cli("print-config", "launch", "--config", "tiny", "--wandb", "--print-config")
    cli("plan", "plan", "--gpu", "H100", "--config", "tiny")
    cli("launch-cloud-dry-run", "launch", "--gpu", "H100", "--config", "tiny", "--name", "cloudy",
        "--store", ex.bucket, "--wandb", "--dry-run")  # fmt: skip

    short = ["train.steps=20", "train.checkpoint_every=10", "train.eval_every=10", "train.log_every=5"]
    short += ["wandb.mode=offline", f"data.path={data}"]
    args = ["launch", "--mode", "local", "--config", "tiny", "--name", "local", "--foreground", "--wandb"]
    args += ["--store", ex.bucket]  # checkpoints and metrics in the bucket too: the canary signs them
    args += [a for o in short for a in ("--override", o)]
    _launch_watching(ex, args, umask, timeout)
    for label, verb in (
        ("status", ["status"]),
        ("status-json", ["status", "--json"]),
        ("status-run-json", ["status", "local", "--json"]),
        ("status-cloud", ["status", "cloudy"]),
        ("logs", ["logs", "local"]),
        ("logs-follow", ["logs", "local", "-f"]),
        ("attach", ["attach", "local"]),
        ("plot", ["plot", "local"]),
        ("generate", ["generate", "local", "--prompt", "ROMEO:", "--max-tokens", "20", "--json"]),
        ("export", ["export", "local", "--hf", str(ex.base / "hf")]),
        ("stop", ["stop", "local"]),
        ("resume-finished", ["resume", "local"]),
        ("resume-cloud", ["resume", "cloudy", "--yes"]),
        ("checkpoints", ["checkpoints", "local", "--json"]),
        ("rm", ["rm", "cloudy", "--yes"]),
    ):
        cli(label, *verb)
    record = runs.read_record(ex.base / "runs" / "local") if (ex.base / "runs" / "local").exists() else None
    if record and record.session:  # the run's processes must be gone before their files are swept
        deadline = time.monotonic() + 60
        while runs.session_pids(record.session) and time.monotonic() < deadline:
            time.sleep(0.1)


def _launch_watching(ex: Exercise, args: list[str], umask: int, timeout: float) -> None:
    """`launch --foreground` of the local run; meanwhile, every process of the run has its command line
    read (repeatedly: Ray renames its workers) and searched for the canaries."""
    from orchestrator import runs

    seen: set[tuple[int, bytes]] = set()
    record_path = ex.base / "runs" / "local" / runs.RUN_RECORD
    t = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args],
            env=ex.env, cwd=REPO, stdout=out, stderr=err, umask=umask,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                session = None
                with contextlib.suppress(OSError, ValueError):
                    session = json.loads(record_path.read_text()).get("session")
                for pid in [proc.pid, *(runs.session_pids(session) if session else [])]:
                    with contextlib.suppress(OSError):
                        line = Path(f"/proc/{pid}/cmdline").read_bytes()
                        if (pid, line) not in seen:
                            seen.add((pid, line))
                            for name in ex.scanner.find(line):
                                ex.cmdline_leaks.append((f"/proc/{pid}/cmdline", name))
                time.sleep(0.1)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    ex.processes = len({pid for pid, _ in seen})
    label = "launch-local"
    ex.commands[label] = Command(
        label, args, proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"),
        time.monotonic() - t,
    )  # fmt: skip
    ex.scanner.scan_bytes(f"{label}: stdout", stdout)
    ex.scanner.scan_bytes(f"{label}: stderr", stderr)


def _scan_bucket(scanner: Scanner, endpoint: str, bucket: str) -> None:
    """Every object of the bucket (not only the store's prefix), with its metadata."""
    from s3 import s3_client

    client = s3_client(endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            got = client.get_object(Bucket=bucket, Key=obj["Key"])
            where = f"s3://{bucket}/{obj['Key']}"
            scanner.scan_bytes(where, got["Body"].read(), kind="objects")
            scanner.scan_bytes(f"{where} (metadata)", json.dumps(got.get("Metadata", {})).encode(), None)


def _reap(root: Path) -> None:
    """Kill whatever is left of the runs under `root` (a failed check must not leave a run training)."""
    from orchestrator import runs

    for path in runs.list_runs(root):
        with contextlib.suppress(OSError, ValueError):
            session = runs.read_record(path).session
            if session:
                runs.kill_session(session)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="lmctl-canary-base-") as d:
        result = exercise(d)
    print(json.dumps(result.summary(), indent=1))
    sys.exit(1 if result.leaks or result.unexpected else 0)
