"""A Hugging Face Hub on loopback: tests run the real huggingface_hub and datasets code for a hub id offline.

`root/<owner>/<name>/` is a dataset repo of the files under it, at one commit whose sha comes from its files.
Subprocesses reach it by `HF_ENDPOINT=<endpoint>`; this process by `use_endpoint(endpoint)`, since both
libraries read HF_ENDPOINT (and HF_HOME, offline flags) once, at import. Only what `HfApi.dataset_info`,
`hf_hub_download`, `HfFileSystem` and streaming `datasets.load_dataset` ask for is served; anything else is a
404 logged in `FakeHub.unserved`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# files kept in git itself on the real hub; every other file is an LFS file (an ETag of its sha256)
_NOT_LFS = {".md", ".gitattributes", ".txt", ".json", ".yaml", ".yml", ".py"}
_DATE = "2024-01-01T00:00:00.000Z"
_CHUNK = 1 << 20
_SETTINGS = ("HF_ENDPOINT", "HF_UPDATE_DOWNLOAD_COUNTS", "HF_HUB_DISABLE_TELEMETRY")
_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class _Missing(Exception):
    """A 404 whose X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) names the client's error."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _File:
    def __init__(self, path: str, data: bytes):
        self.path = path
        self.size = len(data)
        self.blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.lfs = Path(path).suffix not in _NOT_LFS and Path(path).name not in _NOT_LFS

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob

    def entry(self, commit: dict | None) -> dict:
        out: dict = {"type": "file", "oid": self.blob, "size": self.size, "path": self.path}
        if self.lfs:
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
            )
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}
        if commit is not None:
            out["lastCommit"] = commit
        return out


class _Snapshot:
    """A repo's files at one moment, and the commit sha they make."""

    def __init__(self, repo_id: str, folder: Path):
        self.folder = folder
        self.files = {
            p.relative_to(folder).as_posix(): _File(p.relative_to(folder).as_posix(), p.read_bytes())
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        h = hashlib.sha1(f"repo {repo_id}\n".encode())
        for f in self.files.values():
            h.update(f"{f.path}\0{f.blob}\n".encode())
        self.sha = h.hexdigest()
        self.dirs = sorted(
            {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}
        )

    def tree_oid(self, path: str) -> str:
        inside = [f"{f.path}\0{f.blob}" for f in self.files.values() if f.path.startswith(path + "/")]
        return hashlib.sha1("\n".join(inside).encode()).hexdigest()

    def entry(self, path: str, expand: bool) -> dict | None:
        commit = {"id": self.sha, "title": "fake commit", "date": _DATE} if expand else None
        if path in self.files:
            return self.files[path].entry(commit)
        if path in self.dirs:
            out = {"type": "directory", "oid": self.tree_oid(path), "path": path}
            if commit is not None:
                out["lastCommit"] = commit
            return out
        return None


class FakeHub:
    """A dataset-only Hub over the folders of `root`; `with FakeHub(root) as endpoint:` serves it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []  # (method, path without query), in arrival order
        # (method, path with query) of the requests that no endpoint here takes: a gap in this fake
        self.unserved: list[tuple[str, str]] = []
        # (repo_id, path, start, end) that each resolve GET asked for
        self.reads: list[tuple[str, str, int, int]] = []
        self.bytes_served = 0  # file bytes written by resolve GETs (less than asked when a client hung up)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._cache: dict[str, tuple[tuple, _Snapshot]] = {}
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hubsim", daemon=True
        )
        self._thread.start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "FakeHub not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            # keep-alive connections too: a pooled one must not reach this hub's threads later
            with self._lock:
                for conn in self._connections:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ repos
    def sha(self, repo_id: str) -> str:
        return self._snapshot(repo_id).sha

    def _snapshot(self, repo_id: str) -> _Snapshot:
        parts = repo_id.split("/")
        folder = self.root.joinpath(*parts)
        if len(parts) != 2 or "" in parts or ".." in parts or not folder.is_dir():
            raise _Missing("RepoNotFound", f"Repository {repo_id} not found")
        stamp = tuple(
            (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
        )
        with self._lock:
            cached = self._cache.get(repo_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        snap = _Snapshot(repo_id, folder)
        with self._lock:
            self._cache[repo_id] = (stamp, snap)
        return snap

    def _at(self, repo_id: str, revision: str) -> _Snapshot:
        snap = self._snapshot(repo_id)
        if revision not in ("main", snap.sha):
            raise _Missing("RevisionNotFound", f"Invalid rev id: {revision}")
        return snap


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries its Content-Length
    timeout = 30  # an idle keep-alive connection's thread ends after this

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's name
        pass

    # ------------------------------------------------------------------ dispatch
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        with self.fake._lock:
            self.fake.requests.append((method, url.path))
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""  # read even when unanswered: keep-alive
        raw = url.path.split("/")  # segments still quoted: a revision or path may hold an encoded '/'
        try:
            if raw[1:3] == ["api", "datasets"] and len(raw) == 4 and raw[3]:  # an id without an owner
                raise _Missing("RepoNotFound", f"Repository {unquote(raw[3])} not found")
            if raw[1:3] == ["api", "datasets"] and len(raw) >= 5:
                repo_id = f"{unquote(raw[3])}/{unquote(raw[4])}"
                rest = raw[5:]
                if not rest and method == "GET":
                    return self._info(repo_id, "main", query)
                if rest[:1] == ["revision"] and len(rest) >= 2 and method == "GET":
                    return self._info(repo_id, unquote("/".join(rest[1:])), query)
                if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
                    return self._tree(repo_id, unquote(rest[1]), unquote("/".join(rest[2:])), query)
                if rest[:1] == ["paths-info"] and len(rest) >= 2 and method == "POST":
                    return self._paths_info(repo_id, unquote("/".join(rest[1:])))
            if (
                raw[1:2] == ["datasets"]
                and len(raw) >= 7
                and raw[4] == "resolve"
                and method in ("GET", "HEAD")
            ):
                repo_id = f"{unquote(raw[2])}/{unquote(raw[3])}"
                return self._resolve(repo_id, unquote(raw[5]), unquote("/".join(raw[6:])), method)
            self._error(404, None, f"no such endpoint: {method} {url.path}")
        except _Missing as e:
            self._error(404, e.code, str(e))

    # ------------------------------------------------------------------ answers
    def _info(self, repo_id: str, revision: str, query: dict) -> None:
        snap = self.fake._at(repo_id, revision)
        blobs = _true(query.get("blobs"))
        siblings = []
        for f in snap.files.values():
            s: dict = {"rfilename": f.path}
            if blobs:
                s.update(size=f.size, blobId=f.blob)
                if f.lfs:
                    s["lfs"] = f.entry(None)["lfs"] | {"sha256": f.sha256}
            siblings.append(s)
        body = {
            "_id": snap.sha[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": snap.sha,
            "lastModified": _DATE,
            "createdAt": _DATE,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "cardData": {},
            "siblings": siblings,
            "usedStorage": sum(f.size for f in snap.files.values()),
        }
        self._json(body, snap.sha)

    def _tree(self, repo_id: str, revision: str, path: str, query: dict) -> None:
        snap = self.fake._at(repo_id, revision)
        path = path.strip("/")
        if path and path not in snap.dirs:
            raise _Missing("EntryNotFound", f"{path} does not exist on {revision}")
        recursive, expand = _true(query.get("recursive")), _true(query.get("expand"))
        prefix = path + "/" if path else ""
        names = [p for p in [*snap.dirs, *snap.files] if p.startswith(prefix) and p != path]
        if not recursive:
            names = [p for p in names if "/" not in p[len(prefix) :]]
        self._json([snap.entry(p, expand) for p in sorted(names)], snap.sha)

    def _paths_info(self, repo_id: str, revision: str) -> None:
        snap = self.fake._at(repo_id, revision)
        body = self.body.decode()
        if "json" in (self.headers.get("Content-Type") or ""):
            form = json.loads(body or "{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(body)
            paths, expand = form.get("paths", []), _true(form.get("expand"))
        found = [snap.entry(p.strip("/"), expand) for p in paths]
        self._json([e for e in found if e is not None], snap.sha)

    def _resolve(self, repo_id: str, revision: str, path: str, method: str) -> None:
        snap = self.fake._at(repo_id, revision)
        f = snap.files.get(path)
        if f is None:
            raise _Missing("EntryNotFound", f"{path} does not exist on {revision}")
        headers = {
            "X-Repo-Commit": snap.sha,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        start, end = 0, f.size  # [start, end)
        status = 200
        wanted = self.headers.get("Range")
        if wanted:
            span = _range(wanted, f.size)
            if span is None:
                headers["Content-Range"] = f"bytes */{f.size}"
                return self._send(416, headers, b"", method)
            start, end = span
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        headers["Content-Length"] = str(end - start)
        self._send(status, headers, b"", method)
        if method != "GET":
            return
        with self.fake._lock:
            self.fake.reads.append((repo_id, path, start, end))
        with open(snap.folder / path, "rb") as fh:
            fh.seek(start)
            left = end - start
            while left:
                chunk = fh.read(min(left, _CHUNK))
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):  # a streaming reader that had enough
                    self.close_connection = True
                    return
                left -= len(chunk)
                with self.fake._lock:
                    self.fake.bytes_served += len(chunk)

    # ------------------------------------------------------------------ plumbing
    def _json(self, body, sha: str) -> None:
        data = json.dumps(body).encode()
        self._send(200, {"Content-Type": "application/json", "X-Repo-Commit": sha}, data, self.command)

    def _error(self, status: int, code: str | None, message: str) -> None:
        if code is None:
            with self.fake._lock:
                self.fake.unserved.append((self.command, self.path))
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": message}).encode(), self.command)

    def _send(self, status: int, headers: dict, data: bytes, method: str) -> None:
        """The status and headers, and `data` unless HEAD; Content-Length is len(data) unless in `headers`."""
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD" and data:
            self.wfile.write(data)


def _true(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


def _range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `bytes=` range, or None when it cannot be satisfied."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if not first:  # bytes=-N: the last N bytes
            n = int(last)
            return (max(0, size - n), size) if n > 0 and size > 0 else None
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    return (start, end) if start < size and start < end else None


# ---------------------------------------------------------------------- clients in this process
def hub_env(endpoint: str, home: Path | None = None) -> dict[str, str]:
    """Environment settings for a subprocess using the fake hub: merge into a copy of os.environ.

    Only HF_ENDPOINT is needed; the others keep datasets' download counter (a HEAD to S3) and the hub's
    telemetry off the network. Unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE in that environment too.
    """
    env = {"HF_ENDPOINT": endpoint, "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if home is not None:
        env["HF_HOME"] = str(home)
    return env


def _patches(endpoint: str, home: Path | None) -> list[tuple[str, str, object]]:
    """(module, attribute, value) that the libraries computed from the environment at import."""
    out: list[tuple[str, str, object]] = [
        ("huggingface_hub.constants", "ENDPOINT", endpoint),
        (
            "huggingface_hub.constants",
            "HUGGINGFACE_CO_URL_TEMPLATE",
            endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        ),
        ("huggingface_hub.constants", "HF_HUB_OFFLINE", False),
        ("huggingface_hub.constants", "HF_HUB_DISABLE_TELEMETRY", True),
        ("datasets.config", "HF_ENDPOINT", endpoint),
        ("datasets.config", "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"),
        ("datasets.config", "HF_HUB_OFFLINE", False),
        ("datasets.config", "HF_DATASETS_OFFLINE", False),
        ("datasets.config", "HF_UPDATE_DOWNLOAD_COUNTS", False),
    ]
    if home is not None:
        home = Path(home)
        out += [
            ("huggingface_hub.constants", "HF_HOME", str(home)),
            ("huggingface_hub.constants", "HF_HUB_CACHE", str(home / "hub")),
            ("huggingface_hub.constants", "HF_ASSETS_CACHE", str(home / "assets")),
            ("huggingface_hub.constants", "HF_XET_CACHE", str(home / "xet")),
            ("datasets.config", "HF_CACHE_HOME", str(home)),
            ("datasets.config", "HF_DATASETS_CACHE", home / "datasets"),
            ("datasets.config", "HF_MODULES_CACHE", home / "modules"),
            ("datasets.config", "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads"),
            ("datasets.config", "EXTRACTED_DATASETS_PATH", home / "datasets" / "downloads" / "extracted"),
        ]
    return out


def _forget_filesystems() -> None:
    """HfFileSystem instances (and their listings) are cached per arguments: a new endpoint needs new ones."""
    hffs = sys.modules.get("huggingface_hub.hf_file_system")
    if hffs is not None:
        hffs.HfFileSystem.clear_instance_cache()


@contextlib.contextmanager
def use_endpoint(endpoint: str, home: Path | None = None) -> Iterator[str]:
    """Send this process's huggingface_hub and datasets (and subprocesses, by the env) to `endpoint`.

    Both libraries read HF_ENDPOINT, HF_HOME and the offline flags once, at import: this sets the environment
    and patches those module constants (importing both libraries), with `home` as a fresh HF_HOME when given,
    and restores everything after.
    """
    import datasets.config  # noqa: F401 - imported here so both are patched, not read later from the env
    import huggingface_hub.constants  # noqa: F401

    saved_env = {k: os.environ.get(k) for k in (*_SETTINGS, *_OFFLINE, "HF_HOME")}
    os.environ.update(hub_env(endpoint, home))
    for k in _OFFLINE:
        os.environ.pop(k, None)
    saved: list[tuple[object, str, object]] = []
    for module, name, value in _patches(endpoint, home):
        mod = sys.modules[module]
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)
    _forget_filesystems()
    try:
        yield endpoint
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_filesystems()
