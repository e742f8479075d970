"""Secrets never land anywhere, and run state is the owner's alone.

With WANDB_API_KEY, the AWS keys and HF_TOKEN set to canary values, every verb runs through the CLI (a real
local Ray run included, its data read from a loopback S3 bucket signed with the canary secret), and every
byte it printed or wrote is searched for them: the runs folder, the stores, the cache, an isolated HOME,
Ray's session folder, the export, every object of the bucket, and the command lines of the run's
processes (tests/canary.py). Everything that holds run state is then checked to grant nothing to group or
others, under the most permissive umask a caller can have: lmctl makes it so, not the caller.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from urllib.parse import quote

import pytest
from canary import CANARIES, REPO, Scanner, exercise, group_or_other, needles, sweep, writable_by_others
from s3 import s3_client

from orchestrator import runs


@contextlib.contextmanager
def process_umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- the sweep itself


def _wandb_log_cutting(payload: bytes, at: int) -> bytes:
    """A .wandb log whose second record is cut into FIRST/LAST fragments at `at` bytes: the fragments
    straddle a 32 KiB block boundary, with a record header between them."""
    block, header = 32768, 7
    out = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    filler = block - len(out) - 2 * header - at
    out += struct.pack("<IHB", 0, filler, 1) + b"f" * filler  # FULL
    out += struct.pack("<IHB", 0, at, 2) + payload[:at]  # FIRST: to the end of the block
    assert len(out) == block
    return out + struct.pack("<IHB", 0, len(payload) - at, 4) + payload[at:]  # LAST


def _png_with_text(text: bytes) -> bytes:
    chunk = b"Comment\0\0" + zlib.compress(text)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I4s", len(chunk), b"zTXt")
        + chunk
        + b"\0" * 4
        + struct.pack(">I4s", 0, b"IEND")
        + b"\0" * 4
    )


def test_the_sweep_finds_a_canary_in_every_form_and_container(tmp_path):
    from model.checkpoint import _torch_save

    secret, token = CANARIES["AWS_SECRET_ACCESS_KEY"], CANARIES["HF_TOKEN"]
    wandb_key, session = CANARIES["WANDB_API_KEY"], CANARIES["AWS_SESSION_TOKEN"]
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("inner/notes.txt", (f"key={wandb_key}\n" + "x" * 500).encode())
    planted = {
        "plain.log": (f"secret {secret} here".encode(), "AWS_SECRET_ACCESS_KEY"),
        "url.txt": (f"https://h/?t={quote(session, safe='')}".encode(), "AWS_SESSION_TOKEN"),
        "json.txt": (json.dumps({"k": secret}).replace("/", "\\/").encode(), "AWS_SECRET_ACCESS_KEY"),
        "utf16.txt": (f"token={token}".encode("utf-16-le"), "HF_TOKEN"),
        "basic0.txt": (b"Basic " + base64.b64encode(f"user:{secret}".encode()), "AWS_SECRET_ACCESS_KEY"),
        "basic1.txt": (b"Basic " + base64.b64encode(f"users:{secret}".encode()), "AWS_SECRET_ACCESS_KEY"),
        "basic2.txt": (b"Basic " + base64.b64encode(f"userss:{secret}".encode()), "AWS_SECRET_ACCESS_KEY"),
        "hex.bin": (b"\x00" + token.encode().hex().encode(), "HF_TOKEN"),
        "deflated.zip": (deflated.getvalue(), "WANDB_API_KEY"),
        "log.gz": (gzip.compress(f"HF_TOKEN={token}".encode()), "HF_TOKEN"),
        "loss.png": (_png_with_text(f"made with {wandb_key}".encode()), "WANDB_API_KEY"),
        "run-x.wandb": (_wandb_log_cutting(f"{{api_key: {wandb_key}}}".encode(), 19), "WANDB_API_KEY"),
    }
    for name, (data, _) in planted.items():
        (tmp_path / "leaky" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "leaky" / name).write_bytes(data)
    pt = tmp_path / "leaky" / "model.pt"
    with open(pt, "wb") as f:
        _torch_save({"note": CANARIES["AWS_ACCESS_KEY_ID"], "w": list(range(10))}, f)

    found = {(Path(where.split("!")[0]).name, name) for where, name in sweep([tmp_path / "leaky"])}
    expected = {(n, canary) for n, (_, canary) in planted.items()} | {("model.pt", "AWS_ACCESS_KEY_ID")}
    assert found == expected
    # the compressed, split and encoded ones were not there as raw bytes: the containers were opened
    for name in ("deflated.zip", "log.gz", "loss.png", "run-x.wandb"):
        raw = (tmp_path / "leaky" / name).read_bytes()
        assert not any(v.encode() in raw for v in CANARIES.values()), name

    # nothing found where there is nothing: the shipped configs, and random bytes
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "noise.bin").write_bytes(os.urandom(1 << 20))
    scanner = Scanner()
    for p in (REPO / "configs", REPO / "tasks", tmp_path / "clean"):
        scanner.scan_tree(p)
    assert scanner.leaks == [] and scanner.files > 5 and scanner.bytes > 1 << 20
    assert all(len(n) >= 12 for v in CANARIES.values() for n in needles(v))


# ---------------------------------------------------------------- permissions, quickly


def test_store_files_follow_the_process_umask_and_are_never_writable_by_others(tmp_path):
    """What the store and atomic_write create is 0o644 less the process's umask: owner-only in lmctl's run
    processes (umask 0o077); elsewhere readable (datasets hold no credentials), never writable by others."""
    from model.shards import atomic_write
    from model.store import open_store

    for mask, want in ((0o077, 0o600), (0o022, 0o644), (0o000, 0o644)):
        root = tmp_path / f"u{mask:03o}"
        root.mkdir()
        (root / "src.pt").write_bytes(b"weights")
        with process_umask(mask):
            store = open_store(f"file://{root}/store")
            store.put_bytes("runs/r/checkpoints/step_000000001/COMMIT", b"{}")
            store.put_file(root / "src.pt", "runs/r/checkpoints/step_000000001/model.pt")
            store.get_file("runs/r/checkpoints/step_000000001/model.pt", root / "cache" / "model.pt")
            atomic_write(root / "manifest.json", [b"{}"])
        written = [
            root / "store/runs/r/checkpoints/step_000000001/COMMIT",
            root / "store/runs/r/checkpoints/step_000000001/model.pt",
            root / "cache/model.pt",
            root / "manifest.json",
        ]
        assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(want) for p in written}, oct(mask)


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_a_rendered_run_is_owner_only_whatever_the_callers_umask(tmp_path, mask):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCTL_")}
    env.update(LMCTL_RUNS_DIR=str(tmp_path / "runs"), LMCTL_CACHE=str(tmp_path / "cache"))
    argv = ["launch", "--config", "tiny", "--name", "dry", "--dry-run"]
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        umask=mask,
    )
    assert out.returncode == 0, out.stderr
    path = tmp_path / "runs" / "dry"
    assert {runs.CONFIG, runs.TASK, runs.RUN_RECORD, "logs"} <= {p.name for p in path.iterdir()}
    assert group_or_other([tmp_path / "runs"]) == []  # the runs root, the run dir and all in it


def test_the_cli_gives_the_callers_umask_back_and_stage_keeps_datasets_shareable(tmp_path, capsys):
    """In-process callers get their umask back. `stage` writes datasets, which hold no credentials:
    readable as the caller's umask allows (here: everything), never writable by group or others."""
    from orchestrator.cli import main

    store = tmp_path / "store"
    with process_umask(0o000):
        assert main(["status", "--runs-dir", str(tmp_path / "runs")]) == 0
        assert os.umask(0o000) == 0o000
        argv = ["stage", "--dataset", str(REPO / "configs/data/shakespeare.jsonl"), "--vocab-size", "512"]
        assert main([*argv, "--store", str(store), "--json"]) == 0
        assert os.umask(0o000) == 0o000
    staged = [p for p in store.rglob("*")]
    assert any(p.name == "manifest.json" for p in staged)
    assert writable_by_others([store]) == []
    assert {oct(mode(p)) for p in staged if p.is_file()} == {"0o644"}
    assert {oct(mode(p)) for p in staged if p.is_dir()} == {"0o755"}


# ---------------------------------------------------------------- every verb, every byte


@pytest.mark.slow
def test_canaries_appear_nowhere_and_run_state_is_owner_only(tmp_path, s3_server):
    """Every verb with canary credentials, under umask 0o000; then the sweep, then the permissions."""
    ex = exercise(tmp_path / "lab", s3_server, umask=0o000)
    summary = ex.summary()
    print(json.dumps({k: v for k, v in summary.items() if k != "verbs"}, indent=1))
    c = ex.commands

    def ok(label: str, *fragments: str) -> None:
        out = c[label].stdout + c[label].stderr
        assert c[label].returncode == 0, f"{label}: {out[-3000:]}"
        assert all(f in out for f in fragments), f"{label}: {out[-3000:]}"

    def refused(label: str, fragment: str) -> None:  # one line, last (staging may have spoken before)
        last = c[label].stderr.strip().splitlines()[-1]
        assert c[label].returncode == 2 and last.startswith("error: ") and fragment in last, c[label].stderr
        assert "Traceback" not in c[label].stderr

    # every verb did its work, so the sweep below searched real output
    assert ex.unexpected == [], {k: c[k].stderr[-2000:] for k in ex.unexpected}
    ok("help", "lmctl")
    ok("presets", "tiny")
    ok("train", "finished at step 2")
    ok("stage", "dataset_uri")
    ok("print-config", "enabled: true")
    ok("plan", "H100")
    ok("launch-cloud-dry-run", "nothing launched")
    ok("launch-local", "finished at step 20")
    ok("status", "local", "cloudy")
    assert {r["name"] for r in json.loads(c["status-json"].stdout)} == {"local", "cloudy"}
    s = json.loads(c["status-run-json"].stdout)
    assert (s["state"], s["step"], s["last_checkpoint"]) == ("finished", 20, 20)
    assert s["data"].startswith(ex.bucket) and s["checkpoints"] == f"{ex.bucket}/runs/local/checkpoints"
    ok("status-cloud", "cloudy")
    ok("logs", "finished at step 20")
    ok("logs-follow", "finished at step 20")
    ok("attach", "finished")
    ok("plot", "loss.png")
    ok("generate")
    assert json.loads(c["generate"].stdout)["step"] == 20
    ok("export", "Hugging Face")
    ok("stop", "not running")
    refused("resume-finished", "nothing to resume")
    refused("resume-cloud", "SkyPilot could not launch cloudy")  # staged, then no API server: refused
    ok("checkpoints")
    assert [c["step"] for c in json.loads(c["checkpoints"].stdout)] == [10, 20]  # read from the bucket
    ok("rm", "cloudy")
    assert not (ex.base / "runs" / "cloudy").exists()

    base = ex.base
    local = base / "runs" / "local"
    assert list(local.glob("wandb/offline-run-*/run-*.wandb")), "wandb logged offline"
    bucket, _, prefix = ex.bucket.removeprefix("s3://").partition("/")
    listed = s3_client(ex.env["AWS_ENDPOINT_URL"]).list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
    keys = [o["Key"].removeprefix(f"{prefix}/") for o in listed.get("Contents", [])]
    assert "runs/local/checkpoints/step_000000020/COMMIT" in keys  # a local run with an s3:// store
    assert any(k.startswith("datasets/") and k.endswith("manifest.json") for k in keys)
    assert (base / "hf" / "config.json").is_file()
    assert ex.areas["ray_sessions"]["files"] > 5, "Ray's session folder (logs) was found and swept"
    assert ex.areas["bucket"]["objects"] >= 5 and ex.areas["cache"]["files"] > 0
    assert ex.areas["home"]["files"] > 0 and ex.processes >= 5  # driver, gcs, raylet, 2 workers, ...
    assert ex.scanner.expanded > 1 << 20  # checkpoint archives opened, wandb records joined

    assert ex.leaks == [], f"canary secrets leaked: {ex.leaks}"

    # owner-only: the runs root and everything under it (run dirs), the plain run (its checkpoints),
    # cached checkpoints and datasets, the export; nothing writable by others. (A file:// store's
    # checkpoints: tests/test_local_runs.py's smoke run.)
    assert group_or_other([base / "runs", base / "plain"]) == []
    assert group_or_other([base / "cache" / "checkpoints", base / "cache" / "datasets", base / "hf"]) == []
    assert writable_by_others([base / "runs", base / "cache", base / "hf", base / "plain"]) == []

    for path in runs.list_runs(base / "runs"):
        session = runs.read_record(path).session
        assert not session or runs.session_pids(session) == [], f"{path.name} left processes behind"
