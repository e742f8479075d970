"""Storage under faults: what checkpoints, metric pushes and shard downloads promise, checked against
loopback S3 (moto) through tests/s3.py's FaultProxy, and on a real full local disk.

The promise, for every operation: it succeeds (after retries where faults hit it) with exactly the bytes
it was given, or it fails loudly (a StoreError or CheckpointError in one line that says what, where and
why) and leaves the previous state intact: the previous checkpoint loads bit-identical, no torn step
is committed, the store's metrics.jsonl is a prefix of the local one, the cache holds no partial shard.

Each scenario is `name(endpoint, tmp, seed=0, trials=N, **options) -> dict` with `endpoint` the URL of a
moto server (tests/s3.py start_moto) and `tmp` an empty scratch folder; it returns

    {"scenario", "faults": {kind: n}, "requests", "ops", "survived", "failed_loudly",
     "previous_intact": bool, "violations": [what broke], "notes": str, "errors": [first messages],
     "seconds"}

`ops == survived + failed_loudly` always; `violations` lists every broken promise (a silent corruption,
an unclear error, a lost or torn checkpoint), so a healthy run has none. tests/test_storage_faults.py
runs each with small sizes; bench/chaos.py with more trials (`run_all`). No pytest here.

Faults: "error" (503 SlowDown), "reset" (RST before the reply), "cut" (GET body cut half-way), "slow"
(reply held up to half a second), "stall" (reply held past the client's read timeout), "abort" (an
upload reset half-way through its body), "torn" (half an upload stored, answered 200), outages of every
request ("error", "reset", "down": connection refused), and "enospc"/"efbig" for the full disk.

Outages and stalls run with fewer attempts and a short read timeout (`retries`), so that a failure takes
seconds rather than the minute of backoff the production settings (model/store.py) allow.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from s3 import FAKE_KEY, FAKE_SECRET, OUTAGES, REGION, FaultProxy, make_bucket  # noqa: E402

MB = 1 << 20


# ---------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def aws_env(endpoint: str | None = None) -> Iterator[None]:
    """Fake credentials for boto3, isolated from ~/.aws; AWS_ENDPOINT_URL_S3=endpoint when given (what a
    pod's environment does for StoreMirror, which opens its store without an endpoint argument)."""
    values = {
        "AWS_ACCESS_KEY_ID": FAKE_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/lmctl-chaos",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/lmctl-chaos",
        "AWS_PROFILE": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_ENDPOINT_URL": None,
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    with _environ(values):
        yield


@contextlib.contextmanager
def _environ(values: dict[str, str | None]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def retries(attempts: int | None = None, read_timeout: float | None = None) -> Iterator[None]:
    """Clients made inside use `attempts` and `read_timeout` instead of model/store.py's settings."""
    import model.store as store

    old = store.MAX_ATTEMPTS, store.READ_TIMEOUT
    store.MAX_ATTEMPTS = attempts or old[0]
    store.READ_TIMEOUT = read_timeout or old[1]
    try:
        yield
    finally:
        store.MAX_ATTEMPTS, store.READ_TIMEOUT = old


def fault_rates(rate: float, *kinds: str) -> dict[str, float]:
    """FaultProxy keywords: `rate` for each kind; twice that for those only uploads or only downloads can
    draw (cut, abort, torn), half for stalls (each costs a read timeout)."""
    scale = {"cut": 2.0, "abort": 2.0, "torn": 2.0, "stall": 0.5}
    return {f"{kind}_rate": rate * scale.get(kind, 1.0) for kind in kinds}


def small_parts(store: Any) -> Any:
    """Multipart from 5 MB (S3's minimum part size) instead of 32 MB, so a 6 MB file goes in 2 parts."""
    from boto3.s3.transfer import TransferConfig

    store.transfer = TransferConfig(
        multipart_threshold=5 * MB, multipart_chunksize=5 * MB, max_concurrency=4, use_threads=True
    )
    return store


class Tally:
    """The figures of one scenario, and the promises it found broken."""

    def __init__(self, scenario: str):
        self.scenario, self.t0 = scenario, time.monotonic()
        self.faults: Counter[str] = Counter()
        self.requests = self.ops = self.survived = self.failed_loudly = 0
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.errors: list[str] = []  # the first few loud failures, as the user reads them
        self.intact_checks = 0

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.violations.append(what)
        return ok

    def ok(self) -> None:
        self.ops += 1
        self.survived += 1

    def loud(self, e: BaseException, *must_name: str) -> str:
        """Count a failure; its message must be one line naming each of `must_name` (alternatives: '|')."""
        self.ops += 1
        self.failed_loudly += 1
        msg = str(e)
        if len(self.errors) < 3:
            self.errors.append(msg[:300])
        self.check(
            "\n" not in msg and msg.strip() != "", f"{type(e).__name__} message is not one line: {msg!r}"
        )
        for name in must_name:
            self.check(any(n in msg for n in name.split("|")), f"error does not name {name!r}: {msg}")
        return msg

    def proxy(self, proxy: FaultProxy) -> None:
        self.faults.update(proxy.faults)
        self.requests += sum(proxy.requests.values())

    def result(self) -> dict[str, Any]:
        assert self.ops == self.survived + self.failed_loudly
        return {
            "scenario": self.scenario,
            "faults": dict(sorted(self.faults.items())),
            "requests": self.requests,
            "ops": self.ops,
            "survived": self.survived,
            "failed_loudly": self.failed_loudly,
            "previous_intact": not any(v.startswith("previous") for v in self.violations),
            "violations": self.violations,
            "notes": "; ".join(self.notes),
            "errors": self.errors,
            "seconds": round(time.monotonic() - self.t0, 1),
        }


def make_state(seed: int, step: int, kb: int) -> dict[str, Any]:
    """A checkpoint state of about `kb` KB in model.pt, different for every (seed, step)."""
    import torch

    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return {
        "model": {"w": torch.randn(kb * 256, generator=g), "b": torch.arange(step, step + 8)},
        "optim": {"m": torch.randn(64, generator=g), "step": step},
    }


def same(a: Any, b: Any) -> bool:
    """Bit-identical nested states."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def clone(state: Any) -> Any:
    import torch

    from model.checkpoint import _map_tensors

    return _map_tensors(state, torch.Tensor.clone)


def check_checkpoints(
    t: Tally, root: str, endpoint: str, cache: Path, good: dict[int, Any], failed: tuple[int, Any] | None
) -> int | None:
    """Through a fault-free reader: every committed step is one that was saved (a failed save may have
    committed, if only a reply was lost), and the newest loads bit-identical (older ones did when they
    were the newest). Returns the newest committed step."""
    from model.checkpoint import Checkpointer

    reader = Checkpointer(root, endpoint_url=endpoint, cache_dir=cache)
    saved = dict(good)
    if failed is not None:
        saved[failed[0]] = failed[1]
    committed = reader.committed_steps()
    t.check(set(committed) <= set(saved), f"previous: steps {committed} are committed, {sorted(saved)} saved")
    if failed is not None and failed[0] in committed:
        t.notes.append(f"step {failed[0]} failed loudly after its COMMIT landed (a lost reply)")
    newest = max(good, default=None)
    if failed is not None and failed[0] in committed:
        newest = max(newest or 0, failed[0])
    t.check((committed or [None])[-1] == newest, f"previous: newest committed {committed}, expected {newest}")
    if newest is not None:
        loaded = reader.load()
        ok = loaded is not None and loaded[1]["step"] == newest and same(loaded[0], saved[newest])
        t.check(ok, f"previous: step {newest} does not load bit-identical")
    t.intact_checks += 1
    shutil.rmtree(cache, ignore_errors=True)
    return newest


# ---------------------------------------------------------------- a. checkpoint uploads


def checkpoint_uploads(
    endpoint: str,
    tmp: Path,
    seed: int = 0,
    trials: int = 3,
    *,
    rate: float = 0.03,
    mb: int = 6,
    kinds: tuple[str, ...] = ("error", "reset", "cut", "slow", "stall", "abort", "torn"),
) -> dict[str, Any]:
    """Saves of a multipart-sized state (model.pt of `mb` MB, parts of 5 MB) to an s3:// root through every
    kind of fault at `rate` each (stalls past a 2 s read timeout), sync and async; after each, a load
    through the same faults.

    Each save commits and loads back bit-identical, or raises loudly and the previous step still loads
    bit-identical through a fault-free reader. Async saves mutate the state right after save() returns:
    what commits must be the state as it was at save()."""
    from model.checkpoint import Checkpointer, CheckpointError
    from model.store import StoreError

    t = Tally("checkpoint_uploads")
    bucket = make_bucket(endpoint)
    with aws_env():
        for mode in ("sync", "async"):
            root = f"{bucket.uri}/ckpt-{mode}"
            rates = fault_rates(rate, *kinds)
            kw = dict(seed=seed * 2 + (mode == "async"), slow_s=(0.05, 0.5), stall_s=3.0)
            with retries(read_timeout=2), FaultProxy(endpoint, **kw, **rates) as proxy:
                ckpt = Checkpointer(
                    root,
                    keep=2,
                    async_save=mode == "async",
                    endpoint_url=proxy.endpoint,
                    cache_dir=tmp / mode,
                )
                small_parts(ckpt._io.store)
                good: dict[int, Any] = {}
                for step in range(1, trials + 1):
                    state = make_state(seed, step, mb * 1024)
                    expected = clone(state)
                    try:
                        ckpt.save(step, state, {"mode": mode})
                        if mode == "async":  # training goes on: the snapshot must not see this
                            state["model"]["w"].add_(1.0)
                        ckpt.wait()
                    except (StoreError, CheckpointError) as e:
                        t.loud(e, bucket.bucket)
                        failed: tuple[int, Any] | None = (step, expected)
                    else:
                        t.ok()
                        good[step] = expected
                        failed = None
                    newest = check_checkpoints(t, root, endpoint, tmp / "reader", good, failed)
                    if newest is None:
                        continue
                    try:  # a restarted worker loads through the same faults
                        state, meta = ckpt.load()
                    except (StoreError, CheckpointError) as e:
                        t.loud(e, bucket.bucket)
                    else:
                        t.ok()
                        want = good.get(newest, failed[1] if failed else None)
                        t.check(
                            meta["step"] == newest and same(state, want),
                            f"load through faults gave step {meta['step']} (newest {newest}) or altered data",
                        )
                ckpt.close()
            t.proxy(proxy)
    t.notes.append(
        f"{trials} saves of {mb} MB each way (sync, async), each followed by a load; rate {rate}/kind"
    )
    return t.result()


def checkpoint_outage(endpoint: str, tmp: Path, seed: int = 0, trials: int = 6) -> dict[str, Any]:
    """Every request fails from a chosen request of a save on (503s, resets, or the endpoint down), sync
    and async: the save raises naming the S3 action and the endpoint, the previous step loads
    bit-identical, the failed step has no COMMIT; after the outage the same step saves fine.
    One more trial starts the outage right after the COMMIT (while pruning): that save succeeds."""
    from model.checkpoint import COMMIT, Checkpointer, CheckpointError
    from model.store import StoreError, open_store

    t = Tally("checkpoint_outage")
    rng = random.Random(seed)
    bucket = make_bucket(endpoint)
    root = f"{bucket.uri}/ckpt"
    with aws_env(), retries(attempts=2), FaultProxy(endpoint, seed=seed) as proxy:
        ckpt = Checkpointer(root, keep=2, endpoint_url=proxy.endpoint, cache_dir=tmp / "cache")
        clean = open_store(root, endpoint)
        good = {1: make_state(seed, 1, 64)}
        ckpt.save(1, good[1], {})
        mark = len(proxy.history)
        good[2] = make_state(seed, 2, 64)
        ckpt.save(2, good[2], {})
        save_requests = proxy.history[mark:]
        commit_at = next(i for i, (m, p, _) in enumerate(save_requests) if m == "PUT" and p.endswith(COMMIT))
        t.notes.append(f"a save is {len(save_requests)} requests, its COMMIT PUT the {commit_at + 1}th")
        step = 2
        for i in range(trials):
            kind, async_save = OUTAGES[i % len(OUTAGES)], i % 2 == 1  # 6 trials: every pair
            after = [0, commit_at][i] if i < 2 else rng.randrange(commit_at + 1)
            step += 1
            state = make_state(seed, step, 64)
            ckpt.async_save = async_save
            proxy.outage(kind, after)
            try:
                ckpt.save(step, state, {})
                ckpt.wait()
            except (StoreError, CheckpointError) as e:
                msg = t.loud(e, proxy.endpoint, "upload to|PUT of|delete of|listing of|HEAD|download of")
                if i < len(OUTAGES):
                    t.notes.append(f"{kind} at request {after + 1}: {msg[:160]}")
            else:
                t.ok()
                t.violations.append(f"a save went through a {kind} outage from request {after + 1}")
            proxy.heal()
            check_checkpoints(t, root, endpoint, tmp / "reader", good, None)
            t.check(not clean.exists(f"step_{step:09d}/{COMMIT}"), f"step {step} has a COMMIT after failing")
            try:  # the outage is over: the same step saves
                ckpt.save(step, state, {})
                ckpt.wait()
            except (StoreError, CheckpointError) as e:
                t.loud(e)
                t.violations.append(f"save after the outage failed: {e}")
            else:
                t.ok()
                good[step] = state  # checked by the next trial's check, or the last one's
        if trials:  # the outage begins after the COMMIT PUT and its HEAD: only pruning fails
            step += 1
            state = make_state(seed, step, 64)
            proxy.outage("error", commit_at + 2)
            try:
                ckpt.save(step, state, {})
                ckpt.wait()
            except (StoreError, CheckpointError) as e:
                t.loud(e)
                t.violations.append(f"a committed save raised because pruning failed: {e}")
            else:
                t.ok()
                good[step] = state
            proxy.heal()
            check_checkpoints(t, root, endpoint, tmp / "reader", good, None)
        ckpt.close()
    t.proxy(proxy)
    return t.result()


# ---------------------------------------------------------------- b. metric writes


def metric_writes(
    endpoint: str, tmp: Path, seed: int = 0, trials: int = 8, *, rate: float = 0.04
) -> dict[str, Any]:
    """StoreMirror (rank 0 of a cloud run) pushes a growing metrics.jsonl through every upload fault, and
    StopRequest polls STOP; then a push during a 503 outage, and one after it.

    A push succeeds and the store's metrics.jsonl equals the local file, or raises StoreError naming
    the object (worker.py: the step fails, the run stops); the store then holds a prefix of the local
    file (metrics are append-only), never something else."""
    from model.store import StoreError, open_store
    from orchestrator.runs import METRICS, STOP, StopRequest, store_key
    from orchestrator.worker import StoreMirror

    t = Tally("metric_writes")
    bucket = make_bucket(endpoint)
    name = "chaos-run"
    local = tmp / name / METRICS
    local.parent.mkdir(parents=True, exist_ok=True)
    clean = open_store(bucket.uri, endpoint)
    key = store_key(name, METRICS)
    rng = random.Random(seed)
    line = 0

    def grow(n: int) -> None:
        nonlocal line
        with open(local, "a") as f:
            for _ in range(n):
                line += 1
                f.write(
                    json.dumps({"step": line, "loss": rng.random(), "lr": 3e-4, "tokens_per_s": 1e5}) + "\n"
                )

    def push(mirror: StoreMirror) -> bool:
        try:
            mirror.push_metrics(now=True)
        except StoreError as e:
            t.loud(e, clean.url(key))
            with aws_env():
                stored = clean.get_bytes(key) if clean.exists(key) else b""
            t.check(
                local.read_bytes().startswith(stored),
                "store's metrics.jsonl is not a prefix of the local one",
            )
            return False
        t.ok()
        with aws_env():
            t.check(clean.get_bytes(key) == local.read_bytes(), "a push succeeded but the store differs")
        return True

    rates = fault_rates(rate, "error", "reset", "cut", "slow", "abort", "torn")
    with FaultProxy(endpoint, seed=seed, slow_s=(0.05, 0.5), **rates) as proxy:  # noqa: SIM117
        with aws_env(proxy.endpoint), _environ({"LMCTL_STORE_POLL_S": "0"}):
            mirror, stop = StoreMirror(bucket.uri, name, local), StopRequest(bucket.uri, name)
            for _ in range(trials):
                grow(rng.randint(1, 200))
                push(mirror)
                try:
                    t.check(not stop.asked(), "asked() is True with no STOP in the store")
                except StoreError as e:
                    t.loud(e, clean.url(store_key(name, STOP)))
                else:
                    t.ok()
            with retries(attempts=2):
                quick = StoreMirror(bucket.uri, name, local)
                grow(5)
                proxy.outage("error")
                if push(quick):
                    t.violations.append("a push went through a total outage")
                proxy.heal()
                grow(5)
                t.check(push(quick), "the first push after the outage failed")
            with aws_env():
                clean.put_bytes(store_key(name, STOP), b"stop\n")
            seen = False
            for _ in range(5):  # a poll may fail loudly under faults; one of a few must see STOP
                try:
                    seen = stop.asked()
                except StoreError as e:
                    t.loud(e, clean.url(store_key(name, STOP)))
                else:
                    t.ok()
                if seen:
                    break
            t.check(seen, "STOP in the store was not seen in 5 polls")
    t.proxy(proxy)
    t.notes.append(f"{trials} pushes of a growing metrics.jsonl ({line} lines), a STOP poll after each")
    return t.result()


# ---------------------------------------------------------------- c. shard downloads


def small_dataset(folder: Path) -> Path:
    """A staged dataset of 3 documents, vocab 512, 8 train and 3 val shards (built once per folder)."""
    from model.config import DEFAULT_CORPUS
    from model.shards import MANIFEST, prepare_dataset, read_jsonl_texts
    from model.tokenizer import Tokenizer

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        texts = list(read_jsonl_texts(DEFAULT_CORPUS))[:3]
        prepare_dataset(texts, Tokenizer.train(texts, 512), folder, 20_000, val_fraction=0.1, dataset="chaos")
    return folder


def _join_fetch_threads() -> None:
    """A failed fetch returns while downloads already running finish in the pool's threads."""
    for thread in threading.enumerate():
        if thread.name.startswith("lmctl-fetch"):
            thread.join(120)


def _check_cache(t: Tally, cache: Path, source: Path) -> int:
    """No temp file left, and every file in the cache is byte-identical to the source; returns their count."""
    files = [p for p in cache.rglob("*") if p.is_file()]
    t.check(not [p for p in files if p.name.startswith(".")], f"temp files left in the cache: {files}")
    for p in files:
        if not p.name.startswith("."):
            t.check(p.read_bytes() == (source / p.name).read_bytes(), f"cache holds a partial {p.name}")
    return len(files)


def shard_downloads(
    endpoint: str,
    tmp: Path,
    seed: int = 0,
    trials: int = 3,
    *,
    rate: float = 0.05,
    dataset: Path | None = None,
) -> dict[str, Any]:
    """fetch_dataset of a staged dataset through every download fault (stalls past a 1.5 s read timeout
    included), into a fresh cache per trial; then a fetch that an outage of resets stops half-way, and
    the same fetch again after it.

    A fetch yields the same bytes (so the same tokens) as the source, or raises StoreError naming the
    file; the cache never holds a partial or temp file, and a refetch downloads only what is missing."""
    from model.shards import read_manifest
    from model.staged import fetch_dataset
    from model.store import StoreError, open_store

    t = Tally("shard_downloads")
    source = small_dataset(dataset or tmp / "dataset")
    manifest = read_manifest(source)
    names = [p.name for p in source.iterdir()]
    bucket = make_bucket(endpoint)
    uri = f"{bucket.uri}/datasets/chaos"
    with aws_env():
        store = open_store(uri, endpoint)
        for name in names:
            store.put_file(source / name, name)
    any_name = "|".join(names)
    with aws_env(), retries(read_timeout=1.5):
        for trial in range(trials):
            rates = fault_rates(rate, "error", "reset", "cut", "slow", "stall")
            with FaultProxy(
                endpoint, seed=seed * 1000 + trial, slow_s=(0.05, 0.5), stall_s=2.5, **rates
            ) as proxy:
                cache = tmp / f"cache-{trial}"
                try:
                    fetch_dataset(uri, cache, wait_all=True, endpoint_url=proxy.endpoint)
                except StoreError as e:
                    t.loud(e, any_name)
                else:
                    t.ok()
                    t.check(
                        _check_cache(t, cache, source) == len(names), "a fetch succeeded with files missing"
                    )
                _join_fetch_threads()
                _check_cache(t, cache, source)
            t.proxy(proxy)
        with retries(attempts=2), FaultProxy(endpoint, seed=seed) as proxy:
            cache = tmp / "cache-outage"
            proxy.outage("reset", after=5 + 3 * 6)  # the manifest (2 requests), tokenizer (3), ~6 shards (3)
            try:
                fetch_dataset(uri, cache, wait_all=True, endpoint_url=proxy.endpoint)
            except StoreError as e:
                msg = t.loud(e, any_name, proxy.endpoint)
                t.notes.append(f"outage: {msg[:160]}")
            else:
                t.ok()
                t.violations.append("a fetch went through a total outage")
            _join_fetch_threads()
            _check_cache(t, cache, source)
            shards = {info.name for info in [*manifest.train, *manifest.val]}
            kept = len(shards & {p.name for p in cache.rglob("*")})
            proxy.heal()
            try:
                staged = fetch_dataset(uri, cache, wait_all=True, endpoint_url=proxy.endpoint)
            except StoreError as e:
                t.loud(e)
                t.violations.append(f"the fetch after the outage failed: {e}")
            else:
                t.ok()
                t.check(_check_cache(t, cache, source) == len(names), "refetch left files missing")
                again = len(staged.downloaded)
                t.check(again == len(shards) - kept, f"the refetch downloaded {again}, {kept} were cached")
                t.notes.append(
                    f"an outage left {kept} of {len(shards)} shards cached; the refetch got the rest"
                )
        t.proxy(proxy)
    return t.result()


# ---------------------------------------------------------------- d. a full local disk


def disk_method(tmp: Path) -> str:
    """How to get a small real filesystem here: "unshare" (tmpfs in a private user+mount namespace),
    "mount" (tmpfs mounted as root), or "rlimit" (RLIMIT_FSIZE: writes past it fail with EFBIG, a real
    OS write failure, not a full disk). LMCTL_CHAOS_DISK forces one."""
    if forced := os.environ.get("LMCTL_CHAOS_DISK"):
        return forced
    probe = Path(tempfile.mkdtemp(dir=tmp, prefix="mount-probe-"))
    try:
        if shutil.which("unshare") and _run(["true"], "unshare", probe, "64k").returncode == 0:
            return "unshare"
        if os.geteuid() == 0 and shutil.which("mount"):
            try:
                if _run(["true"], "mount", probe, "64k").returncode == 0:
                    return "mount"
            except (OSError, subprocess.CalledProcessError):
                pass
        return "rlimit"
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _run(
    cmd: list[str], method: str, where: Path, size: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `cmd` with a `size` filesystem at `where` (see disk_method); rlimit: `size` caps file sizes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    kw: dict[str, Any] = dict(capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if method == "unshare":
        script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
        return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", size, str(where), *cmd], **kw)
    if method == "mount":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
        try:
            return subprocess.run(cmd, **kw)
        finally:
            subprocess.run(["umount", "-l", str(where)], check=False)
    # Through a small exec wrapper rather than preexec_fn, which is unsafe in a process with threads.
    return subprocess.run([sys.executable, __file__, "capped", str(_size_bytes(size)), *cmd], **kw)


def _capped(limit: int, cmd: list[str]) -> None:
    """Exec `cmd` with files capped at `limit` bytes; SIGXFSZ ignored, so a write past it fails with EFBIG
    (both survive exec)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    os.execvp(cmd[0], cmd)


def _size_bytes(size: str) -> int:
    return int(size[:-1]) * {"k": 1 << 10, "m": 1 << 20}[size[-1]] if size[-1] in "km" else int(size)


def full_disk(
    endpoint: str,
    tmp: Path,
    seed: int = 0,
    trials: int = 1,
    *,
    method: str | None = None,
    async_modes: tuple[bool, ...] = (False, True),
) -> dict[str, Any]:
    """Checkpoint saves that hit a full disk, with a folder root (the disk holds the checkpoints) and an
    s3:// root (the disk holds the cache, where files are serialised before upload), sync and async.

    In a child process on a small tmpfs (or under RLIMIT_FSIZE, see disk_method): save step 1, fill the
    disk, save step 2: it must raise saying ENOSPC (or EFBIG) and where; step 1 loads bit-identical, step
    2 has no COMMIT and (folder) no leftover files; a fresh cache on the full disk cannot load (loudly);
    free the space, save step 3: it commits and loads."""
    method = method or disk_method(tmp)
    t = Tally("full_disk")
    bucket = make_bucket(endpoint)
    disk = tmp / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    args = {"disk": str(disk), "endpoint": endpoint, "uri": bucket.uri, "seed": seed, "trials": trials}
    args["method"], args["async_modes"] = method, list(async_modes)
    with aws_env():
        child = _run([sys.executable, __file__, "disk-child", json.dumps(args)], method, disk, "8m")
    _merge_child(t, child)
    t.notes.insert(0, f"disk: {method}")
    return t.result()


def _merge_child(t: Tally, child: subprocess.CompletedProcess) -> None:
    try:
        out = json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        t.violations.append(f"child exited {child.returncode}: {child.stderr[-2000:]}")
        return
    t.faults.update(out["faults"])
    t.ops, t.survived, t.failed_loudly = out["ops"], out["survived"], out["failed_loudly"]
    t.violations += out["violations"]
    t.errors += out["errors"]
    t.notes += [out["notes"]] if out["notes"] else []


def previous_intact(t: Tally, ckpt: Any, state: Any, what: str) -> None:
    t.check(ckpt.latest() == 1, f"previous: {what} latest() is {ckpt.latest()} after a full disk")
    got, meta = ckpt.load()
    t.check(same(got, state) and meta["step"] == 1, f"previous: {what} step 1 loads altered")


def _disk_child(args: dict[str, Any]) -> dict[str, Any]:
    """The child of full_disk: runs on the small filesystem (or under the file size limit)."""
    import logging

    from model.checkpoint import COMMIT, Checkpointer, CheckpointError
    from model.store import StoreError, open_store

    logging.disable(logging.WARNING)  # the fallback warnings of a load on a full disk are expected
    t = Tally("full_disk")
    disk, seed, method = Path(args["disk"]), args["seed"], args["method"]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    filler = disk / "filler"

    def fill() -> None:
        if method == "rlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, hard))
            return
        with open(filler, "wb") as f:  # until the disk is full: 64 KB at a time, then what still fits
            try:
                while True:
                    f.write(b"\0" * (64 << 10))
                    f.flush()
            except OSError:
                pass
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())

    def free() -> None:
        if method == "rlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        else:
            filler.unlink(missing_ok=True)

    errno_name = "EFBIG" if method == "rlimit" else "ENOSPC"
    for trial in range(args["trials"]):
        for root_kind in ("folder", "s3"):
            for async_save in args["async_modes"]:
                where = disk / f"{root_kind}-{int(async_save)}-{trial}"
                if root_kind == "folder":
                    root: str | Path = where / "ckpt"
                    endpoint, cache = None, None
                else:
                    root = f"{args['uri']}/{where.name}"
                    endpoint, cache = args["endpoint"], where / "cache"
                ckpt = Checkpointer(
                    root, keep=2, async_save=async_save, endpoint_url=endpoint, cache_dir=cache
                )
                s1, s2, s3 = (make_state(seed, s, 256) for s in (1, 2, 3))
                ckpt.save(1, s1, {})
                ckpt.wait()
                fill()
                try:
                    ckpt.save(2, s2, {})
                    ckpt.wait()
                except (CheckpointError, StoreError, OSError) as e:
                    msg = t.loud(e, errno_name, str(where))
                    t.faults[errno_name.lower()] += 1
                    if not trial and not async_save:
                        t.notes.append(f"{root_kind}: {msg}")
                else:
                    t.ok()
                    t.violations.append(f"{root_kind} save of step 2 went through a full disk")
                if root_kind == "s3":  # a fresh machine whose cache is on the full disk cannot load
                    fresh = Checkpointer(root, endpoint_url=endpoint, cache_dir=where / "cache-fresh")
                    try:
                        got = fresh.load()
                    except (CheckpointError, StoreError, OSError) as e:
                        msg = t.loud(e, errno_name, str(where))
                        if not trial and not async_save:
                            t.notes.append(f"load into a full cache: {msg}")
                    else:
                        t.ok()
                        t.check(got is not None and got[1]["step"] == 1, "load on a full disk gave no step 1")
                    shutil.rmtree(where / "cache-fresh", ignore_errors=True)
                if root_kind == "folder":
                    leftovers = list((where / "ckpt" / "step_000000002").glob("*"))
                    t.check(not leftovers, f"the failed step's files stay on the full disk: {leftovers}")
                    previous_intact(t, ckpt, s1, root_kind)  # loading reads, it needs no space
                    free()
                else:
                    store = open_store(str(root), endpoint)
                    t.check(not store.exists(f"step_000000002/{COMMIT}"), "the failed step has a COMMIT")
                    temps = [p for p in (where / "cache").rglob("*") if p.is_file() and "upload-" in str(p)]
                    t.check(not temps, f"temp files stay in the full cache: {temps}")
                    free()
                    previous_intact(t, ckpt, s1, root_kind)  # loading downloads into the cache first
                try:
                    ckpt.save(3, s3, {})
                    ckpt.wait()
                except (CheckpointError, StoreError, OSError) as e:
                    t.loud(e)
                    t.violations.append(f"{root_kind} save after freeing space failed: {e}")
                else:
                    t.ok()
                    state, meta = ckpt.load()
                    t.check(same(state, s3) and meta["step"] == 3, f"{root_kind} step 3 loads altered")
                    t.check(
                        ckpt.committed_steps() == [1, 3], f"{root_kind} committed {ckpt.committed_steps()}"
                    )
                ckpt.close()
                shutil.rmtree(where, ignore_errors=True)
    return t.result()


def train_full_disk(
    endpoint: str,
    tmp: Path,
    seed: int = 0,
    trials: int = 1,
    *,
    method: str | None = None,
    dataset: Path | None = None,
    async_modes: tuple[bool, ...] = (True, False),
) -> dict[str, Any]:
    """`python -m model.train` whose checkpoints folder is a 64 KB filesystem (or whose files may not pass
    64 KB): the first checkpoint write fails; it must exit non-zero with one `error: ...` line naming the
    full disk, and no traceback. `endpoint` is unused (uniform signature)."""
    from model.config import resolve

    method = method or disk_method(tmp)
    t = Tally("train_full_disk")
    data = small_dataset(dataset or tmp / "dataset")
    from test_train import SMALL  # the small model the training tests use; a checkpoint every 2 steps

    overrides = [*SMALL, "train.micro_batch_size=4", "train.steps=4", "train.warmup_steps=1"]
    overrides += ["train.eval_every=100", "train.eval_batches=1", "train.checkpoint_every=2"]
    overrides.append(f"data.path={data}")
    errno_name = "EFBIG" if method == "rlimit" else "ENOSPC"
    words = "File too large" if method == "rlimit" else "No space left on device"
    for trial in range(trials):
        for async_save in async_modes:
            run = tmp / f"train-{trial}-{int(async_save)}"
            (run / "checkpoints").mkdir(parents=True)
            spec = resolve(
                "tiny", [*overrides, f"train.seed={seed + trial}", f"train.async_checkpoint={async_save}"]
            )
            (run / "config.yaml").write_text(spec.to_yaml())
            cmd = [
                sys.executable,
                "-m",
                "model.train",
                "--config",
                str(run / "config.yaml"),
                "--run-dir",
                str(run),
            ]
            env = {"OMP_NUM_THREADS": "1", "LMCTL_CACHE": str(tmp / "lmctl-cache")}
            with _environ(env):
                proc = _run(cmd, method, run / "checkpoints", "64k")
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            last = lines[-1] if lines else ""
            t.ops += 1
            if proc.returncode == 0:
                t.survived += 1
                t.violations.append(
                    f"training exited 0 with checkpoints on a full disk: {proc.stdout[-300:]}"
                )
                continue
            t.failed_loudly += 1
            t.faults[errno_name.lower()] += 1
            t.errors += [last] if len(t.errors) < 3 else []
            t.check("Traceback" not in proc.stderr, f"training printed a traceback: {proc.stderr[-1500:]}")
            t.check(
                last.startswith("error: ") and words in last,
                f"last stderr line is not a clear error: {last!r}",
            )
            t.check(str(run / "checkpoints") in last, f"the error does not say where: {last!r}")
            if not trial:
                t.notes.append(f"{'async' if async_save else 'sync'} exit {proc.returncode}: {last[:200]}")
    t.notes.insert(0, f"disk: {method}")
    return t.result()


# ---------------------------------------------------------------- all of them


def run_all(endpoint: str, tmp: Path, seed: int = 0, trials: int = 3) -> list[dict[str, Any]]:
    """Every scenario, `trials` scaling each; one shared dataset."""
    tmp = Path(tmp)
    dataset = small_dataset(tmp / "dataset")
    runs = [
        (checkpoint_uploads, {"trials": trials}),
        (checkpoint_outage, {"trials": 2 * trials}),
        (metric_writes, {"trials": 3 * trials}),
        (shard_downloads, {"trials": trials, "dataset": dataset}),
        (full_disk, {"trials": max(1, trials // 3)}),
        (train_full_disk, {"trials": max(1, trials // 3), "dataset": dataset}),
    ]
    out = []
    for fn, kw in runs:
        scratch = tmp / fn.__name__
        scratch.mkdir(parents=True, exist_ok=True)
        out.append(fn(endpoint, scratch, seed, **kw))
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "disk-child":
        print(json.dumps(_disk_child(json.loads(sys.argv[2]))))
    elif len(sys.argv) > 3 and sys.argv[1] == "capped":
        _capped(int(sys.argv[2]), sys.argv[3:])
    else:  # python tests/chaos_storage.py [trials]: every scenario against a fresh moto server
        from s3 import start_moto

        server, url = start_moto()
        try:
            with tempfile.TemporaryDirectory() as scratch:
                for figures in run_all(url, Path(scratch), 0, int(sys.argv[1]) if len(sys.argv) > 1 else 3):
                    print(json.dumps(figures))
        finally:
            server.stop()
