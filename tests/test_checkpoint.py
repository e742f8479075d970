"""Checkpoints: round trip, bit-exact resume, pruning, corruption fallback, async snapshots, SIGKILL."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model import checkpoint as ck
from model import faults
from model.checkpoint import COMMIT, Checkpointer, CheckpointError, rng_state, set_rng_state

REPO = Path(__file__).resolve().parent.parent


def files_of(c: Checkpointer, step: int) -> list[str]:
    return sorted(p.name for p in c.step_dir(step).iterdir())


# ---------------------------------------------------------------- a tiny training setup that uses every RNG


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def train_step(model, opt, sched) -> torch.Tensor:
    """One step whose loss depends on torch (data, dropout), numpy and python RNG draws."""
    x = torch.randn(32, 8)
    noise = float(np.random.standard_normal()) + random.random()
    loss = ((model(x) - x.sum(1, keepdim=True) - noise) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach()


def full_state(model, opt, sched) -> dict:
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "rng": rng_state(),
    }


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_round_trip_and_bit_exact_resume(tmp_path):
    seed_all(1)
    model, opt, sched = make()
    for _ in range(3):
        train_step(model, opt, sched)
    c = Checkpointer(tmp_path)
    saved = full_state(model, opt, sched)
    c.save(3, saved, {"note": "x"})
    saved = copy.deepcopy(saved)  # state_dict tensors are the live ones, which training goes on changing
    expected = [train_step(model, opt, sched) for _ in range(2)]  # never stopped

    seed_all(99)  # a fresh process: other weights, other RNG positions
    model2, opt2, sched2 = make(seed=5)
    state, meta = c.load()
    assert meta["step"] == 3 and meta["note"] == "x"
    for k, v in saved["model"].items():
        assert torch.equal(state["model"][k], v)
    for i, s in saved["optim"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state["optim"]["state"][i][k], s[k])
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optim"])
    sched2.load_state_dict(state["sched"])
    set_rng_state(state["rng"])
    resumed = [train_step(model2, opt2, sched2) for _ in range(2)]
    assert [t.item() for t in resumed] == [t.item() for t in expected]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


def test_rng_state_restores_every_generator():
    seed_all(3)
    st = rng_state()
    draw = lambda: (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    first = draw()
    draw()
    set_rng_state(st)
    assert draw() == first


@pytest.mark.parametrize("async_save", [False, True])
def test_tied_tensors_are_stored_once(tmp_path, async_save):
    w = torch.randn(256, 64)
    c = Checkpointer(tmp_path, async_save=async_save)
    c.save(1, {"model": {"emb": w, "head": w.detach()}}, {})
    c.wait()
    assert (c.step_dir(1) / "model.pt").stat().st_size < w.numel() * 4 * 1.5
    state, _ = c.load()
    assert state["model"]["emb"].data_ptr() == state["model"]["head"].data_ptr()
    assert torch.equal(state["model"]["head"], w)


def test_load_selected_keys_and_empty_root(tmp_path):
    c = Checkpointer(tmp_path)
    assert c.load() is None and c.latest() is None and c.committed_steps() == []
    c.save(7, {"model": {"w": torch.ones(2)}, "optim": {"m": torch.zeros(2)}}, {})
    state, meta = c.load(keys=["model"])
    assert list(state) == ["model"] and meta["step"] == 7
    with pytest.raises(KeyError):
        c.load(keys=["nope"])
    with pytest.raises(CheckpointError):
        c.load(step=6)
    with pytest.raises(ValueError):
        c.save(8, {"bad/key": {}}, {})


# ---------------------------------------------------------------- pruning and leftovers


def test_keep_last_k_and_clean_uncommitted(tmp_path):
    c = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        c.save(step, {"model": {"w": torch.full((4,), float(step))}}, {})
    assert c.committed_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000003", "step_000000004"]

    # leftovers of crashed saves: one older than the newest commit, one newer (a future the run may redo)
    for step in (2, 9):
        c.step_dir(step).mkdir()
        (c.step_dir(step) / "model.pt").write_bytes(b"half")
    assert c.committed_steps() == [3, 4]
    c.save(5, {"model": {"w": torch.zeros(4)}}, {})
    assert c.committed_steps() == [4, 5]
    assert not c.step_dir(2).exists() and not c.step_dir(3).exists()
    assert c.step_dir(9).exists()  # not older than the newest commit: left for a later save of step 9

    c.save(9, {"model": {"w": torch.ones(4)}}, {})  # overwrites the leftover
    assert files_of(c, 9) == [COMMIT, "meta.json", "model.pt"]
    assert torch.equal(c.load()[0]["model"]["w"], torch.ones(4))
    assert c.committed_steps() == [5, 9]

    c.save(3, {"model": {"w": torch.ones(4)}}, {})  # older than the kept ones: still never pruned at once
    assert c.committed_steps() == [3, 5, 9]


# ---------------------------------------------------------------- corruption


def _truncate(d: Path) -> None:
    p = d / "model.pt"
    p.write_bytes(p.read_bytes()[:-100])


def _flip_byte(d: Path) -> None:
    p = d / "model.pt"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _delete_file(d: Path) -> None:
    (d / "model.pt").unlink()


def _bad_commit(d: Path) -> None:
    (d / COMMIT).write_text('{"step": 2, "fi')


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _delete_file, _bad_commit])
def test_corrupt_newest_falls_back(tmp_path, caplog, damage):
    c = Checkpointer(tmp_path)
    for step in (1, 2):
        c.save(step, {"model": {"w": torch.arange(1000.0) + step}}, {})
    damage(c.step_dir(2))
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        state, meta = c.load()
    assert meta["step"] == 1
    assert torch.equal(state["model"]["w"], torch.arange(1000.0) + 1)
    if damage is not _bad_commit:
        assert "step 2 is unusable" in caplog.text
    with pytest.raises(CheckpointError):
        c.load(step=2)


# ---------------------------------------------------------------- async


@pytest.fixture
def gated_writes(monkeypatch):
    """Make the storage layer wait for `release` before each file, and report that writing began."""
    started, release, order = threading.Event(), threading.Event(), []
    real = ck._write_stream

    def write_stream(path, fill):
        order.append(path.parent.name)
        started.set()
        assert release.wait(timeout=30), "test never released the writer"
        return real(path, fill)

    monkeypatch.setattr(ck, "_write_stream", write_stream)
    return started, release, order


def test_async_save_returns_before_writing_and_snapshots(tmp_path, gated_writes):
    started, release, _ = gated_writes
    model = nn.Linear(64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = Checkpointer(tmp_path, async_save=True)
    c.save(1, {"model": model.state_dict()}, {})
    assert started.wait(timeout=30)  # the writer thread is running and blocked on the gate...
    assert c.latest() is None  # ...and save() has already returned with nothing committed
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training mutates the weights while the save is in flight
    release.set()
    c.wait()
    assert c.latest() == 1
    state, _ = c.load()
    assert all(torch.equal(state["model"][k], v) for k, v in before.items())


def test_async_snapshot_buffers_are_reused_safely(tmp_path):
    model = nn.Linear(32, 32)
    c = Checkpointer(tmp_path, keep=3, async_save=True)
    expected, buffers = {}, {}
    for step in (1, 2, 3):
        expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
        c.save(step, {"model": model.state_dict()}, {})
        buffers[step] = list(c._buffers)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0).add_(1.0)
    c.wait()
    assert len(buffers[3]) == 2 and all(a is b for a, b in zip(buffers[2], buffers[3], strict=True))
    for step, want in expected.items():
        state, _ = c.load(step=step)
        assert all(torch.equal(state["model"][k], v) for k, v in want.items())
    c.close()
    assert c._buffers == []


@pytest.mark.gpu
def test_async_save_of_cuda_state(tmp_path):
    w = torch.randn(1000, 100, device="cuda")
    c = Checkpointer(tmp_path, async_save=True)
    for step in (1, 2):
        c.save(step, {"model": {"w": w}, "rng": rng_state()}, {})
        want = w.cpu()
        w.add_(1.0)
    c.close()
    state, _ = c.load(map_location="cuda")
    assert state["model"]["w"].is_cuda and torch.equal(state["model"]["w"].cpu(), want)


def test_async_saves_are_serialised(tmp_path, gated_writes):
    _, release, order = gated_writes
    release.set()
    c = Checkpointer(tmp_path, keep=5, async_save=True)
    for step in (1, 2, 3):
        c.save(step, {"a": {"x": torch.ones(10)}, "b": {"y": torch.ones(10)}}, {})
    c.close()
    assert order == sorted(order) and len(order) == 9  # 3 files per save, never interleaved
    assert c.committed_steps() == [1, 2, 3]


def test_async_error_is_raised_by_wait(tmp_path, monkeypatch):
    def failing(path, fill):
        raise OSError("disk full")

    c = Checkpointer(tmp_path, async_save=True)
    with monkeypatch.context() as m:
        m.setattr(ck, "_write_stream", failing)
        c.save(1, {"model": {"w": torch.ones(1)}}, {})
        with pytest.raises(OSError, match="disk full"):
            c.wait()
    c.save(2, {"model": {"w": torch.ones(1)}}, {})  # the error was reported once; saving works again
    c.close()
    assert c.committed_steps() == [2]


# ---------------------------------------------------------------- SIGKILL at a fault point


def test_fault_spec_parsing(monkeypatch):
    assert faults._parse("checkpoint.after_file:2, stage.upload, train.step:3:TERM, x:1:SESSION") == {
        "checkpoint.after_file": (2, "KILL"),
        "stage.upload": (1, "KILL"),
        "train.step": (3, "TERM"),
        "x": (1, "SESSION"),
    }
    with pytest.raises(KeyError):
        faults._parse("train.step:1:KIL")  # a typo is caught when read, not ignored
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()
    faults.fault_point("checkpoint.after_file")  # unset: a no-op that counts nothing
    assert not faults._hits


def test_session_fault_kills_every_process_of_the_session(tmp_path):
    """`:SESSION` is a power cut: the process at the fault point and every other one in its session die."""
    script = (
        "import subprocess, sys, time\n"
        "from model.faults import fault_point\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "open(sys.argv[1], 'w').write(str(child.pid))\n"
        "fault_point('x')\n"
        "time.sleep(600)\n"
    )
    pid_file = tmp_path / "child.pid"
    env = {**os.environ, faults.ENV: "x:1:SESSION", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(pid_file)], env=env, cwd=REPO, start_new_session=True
    )
    assert proc.wait(timeout=60) == -signal.SIGKILL
    child = int(pid_file.read_text())
    assert os.getsid(0) != proc.pid  # the test itself is in another session and still alive
    stat = Path(f"/proc/{child}/stat")

    def dead() -> bool:  # gone, or a zombie not yet reaped by init
        try:
            return stat.read_text().split(") ")[1][0] in "ZX"
        except (OSError, IndexError):
            return True

    deadline = time.monotonic() + 30  # SIGKILL is delivered asynchronously: give the kernel its moment
    while not dead():
        assert time.monotonic() < deadline, "the other process of the session survived"
        time.sleep(0.01)


CRASH_SCRIPT = """
import sys, torch
from model.checkpoint import Checkpointer
c = Checkpointer(sys.argv[1], keep=3, async_save=sys.argv[2] == "1")
for step in (1, 2, 3):
    state = {"model": {"w": torch.full((100_000,), float(step))}, "extra": {"x": torch.arange(10)}}
    c.save(step, state, {"attempt": "first"})
c.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize(
    "fault, async_save",
    [
        ("checkpoint.after_file:2", False),
        ("checkpoint.before_commit:2", False),
        ("checkpoint.after_file:2", True),
    ],
)
def test_sigkill_leaves_previous_checkpoint_usable(request, tmp_path, fault, async_save, where):
    """The same COMMIT protocol in a local folder and in an object store (loopback S3)."""
    endpoint = None
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")  # also sets s3_env's fake credentials
        root, endpoint = f"{bucket.uri}/runs/r1/checkpoints", bucket.endpoint
    else:
        root = str(tmp_path / "ckpt")
    env = {**os.environ, faults.ENV: fault, "PYTHONPATH": str(REPO), "LMCTL_CACHE": str(tmp_path / "child")}
    if endpoint:
        env["AWS_ENDPOINT_URL_S3"] = endpoint
    args = [sys.executable, "-c", CRASH_SCRIPT, root, "1" if async_save else "0"]
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr

    c = Checkpointer(root, keep=3, endpoint_url=endpoint, cache_dir=tmp_path / "cache")
    names = lambda step: sorted(c._io.names(f"step_{step:09d}"))
    assert c.latest() == 1 and c.committed_steps() == [1]
    half = names(2)
    assert COMMIT not in half and "model.pt" in half
    assert ("extra.pt" in half) == fault.startswith("checkpoint.before_commit")
    state, meta = c.load()
    assert meta["step"] == 1 and meta["attempt"] == "first"
    assert torch.equal(state["model"]["w"], torch.full((100_000,), 1.0))

    c.save(2, {"model": {"w": torch.full((100_000,), 2.0)}}, {"attempt": "second"})
    assert c.committed_steps() == [1, 2]
    assert names(2) == [COMMIT, "meta.json", "model.pt"]  # the crashed attempt's files are gone
    commit = json.loads(c._io.read_bytes(f"step_{2:09d}", COMMIT))
    assert set(commit["files"]) == {"model.pt", "meta.json"}
    assert c.load()[1]["attempt"] == "second"
