"""Checkpoint I/O: save and load time for 124m- and 1b-sized training states on local disk.

The state is what the training loop saves (model/state.py): fp32 weights plus AdamW's exp_avg and
exp_avg_sq (3 x params x 4 bytes), as plain tensors with the decoder's names and shapes. For each size we time
  - two asynchronous saves: the time until save() returns (the snapshot: the stall training sees),
    and until the COMMIT is written (serialise + crc32 + write + fsync = the save time). The first
    save allocates the snapshot buffers; the second copies into them, as every later save does.
  - a cold load (page cache dropped for the files): verify crc32 + map, then + copy into live tensors.
A 1b state (14.7 GB) plus its CPU snapshot (another 14.7 GB) does not fit this 24 GB machine, and
weights + one moment would need ~20 GB; so by default the 1b case saves the weights alone (4.9 GB,
~10 GB peak) and the figures are extrapolated x3 (I/O is linear in bytes: compare 124m and 350m, and
the 350m state is about the size of the 1b weights). --full-1b measures the whole state (~32 GB RAM).

    python -m bench.checkpoint_io [--sizes 124m,1b] [--root /tmp/lmctl-ckpt-bench] [--full-1b] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from model.checkpoint import Checkpointer
from model.config import ModelConfig, param_count, resolve
from model.decoder import Decoder

MOMENTS = ("exp_avg", "exp_avg_sq")
RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_io.json"


def param_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The decoder's own parameter names and shapes, from a Decoder built on the meta device (no memory)."""
    with torch.device("meta"):
        decoder = Decoder(m)
    shapes = {k: tuple(p.shape) for k, p in decoder.named_parameters()}
    assert sum(torch.Size(s).numel() for s in shapes.values()) == param_count(m)
    return shapes


def fake_state(m: ModelConfig, moments: int, device: str) -> dict:
    """{"model": weights, "optim": AdamW-like state_dict with `moments` of exp_avg / exp_avg_sq}."""
    shapes = param_shapes(m)
    model = {k: torch.empty(s, device=device).uniform_(-0.02, 0.02) for k, s in shapes.items()}
    optim_state = {
        k: {"step": torch.tensor(1000.0)} | {n: torch.rand(s, device=device) for n in MOMENTS[:moments]}
        for k, s in shapes.items()
    }
    groups = [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(shapes)}]
    return {"model": model, "optim": {"state": optim_state, "param_groups": groups}}


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def drop_page_cache(d: Path) -> None:
    """Evict the files' clean pages so a load reads the disk, as after a restart (no root needed)."""
    for p in d.iterdir():
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def disk_baseline(root: Path, nbytes: int = 1 << 29) -> dict:
    """Raw sequential write+fsync and cold read of one file: the ceiling for the figures below."""
    p, buf = root / "baseline.bin", os.urandom(1 << 24)
    t0 = time.perf_counter()
    with open(p, "wb") as f:
        for _ in range(nbytes // len(buf)):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    drop_page_cache(root)
    t0 = time.perf_counter()
    with open(p, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    read_s = time.perf_counter() - t0
    p.unlink()
    return {"bytes": nbytes, "write_MBps": nbytes / write_s / 1e6, "read_MBps": nbytes / read_s / 1e6}


def timed_save(c: Checkpointer, step: int, state: dict, name: str) -> tuple[float, float]:
    """(seconds until save() returns, seconds until committed)."""
    t0 = time.perf_counter()
    c.save(step, state, {"bench": name})
    stall = time.perf_counter() - t0
    c.wait()
    return stall, time.perf_counter() - t0


def bench_one(name: str, root: Path, moments: int, device: str) -> dict:
    m = resolve(name).model
    t0 = time.perf_counter()
    state = fake_state(m, moments, device)
    synchronize(device)
    build_s = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in tensors(state))
    shutil.rmtree(root / name, ignore_errors=True)

    c = Checkpointer(root / name, keep=1, async_save=True)
    first_stall, first_total = timed_save(c, 1, state, name)
    stall, total = timed_save(c, 2, state, name)
    c.close()
    gc.collect()

    drop_page_cache(c.step_dir(2))
    t0 = time.perf_counter()
    loaded, _ = c.load()
    load_s = time.perf_counter() - t0
    for dst, src in zip(tensors(state), tensors(loaded), strict=True):
        dst.copy_(src)  # what load_state_dict does: touches every mapped page
    synchronize(device)
    load_copy_s = time.perf_counter() - t0
    del loaded, state
    gc.collect()
    shutil.rmtree(root / name)

    mb = nbytes / 1e6
    return {
        "preset": name,
        "params": param_count(m),
        "measured": "weights" + "".join(f" + {n}" for n in MOMENTS[:moments]),
        "bytes": nbytes,
        "build_state_s": build_s,
        "first_save_stall_s": first_stall,
        "first_save_total_s": first_total,
        "save_stall_s": stall,
        "save_total_s": total,
        "save_MBps": mb / total,
        "load_verify_map_s": load_s,
        "load_and_copy_s": load_copy_s,
        "load_MBps": mb / load_copy_s,
    }


TIMES = ("first_save_stall_s", "first_save_total_s", "save_stall_s", "save_total_s", "load_verify_map_s")


def extrapolate(r: dict, moments: int) -> dict:
    """Scale a partial state's times to weights + 2 moments (I/O time is linear in bytes)."""
    f = 3.0 / (1 + moments)
    return (
        {
            "preset": r["preset"],
            "params": r["params"],
            "measured": f"extrapolated x{f:.0f} from {r['measured']}",
            "bytes": int(r["bytes"] * f),
        }
        | {k: r[k] * f for k in (*TIMES, "load_and_copy_s")}
        | {k: r[k] for k in ("save_MBps", "load_MBps")}
    )


def report(x: dict) -> None:
    print(
        f"{x['preset']:>5} {x['bytes'] / 1e9:5.2f} GB ({x['measured']})\n"
        f"      save: stall {x['save_stall_s']:5.2f}s (first save {x['first_save_stall_s']:5.2f}s), "
        f"committed after {x['save_total_s']:6.2f}s (first {x['first_save_total_s']:6.2f}s), "
        f"{x['save_MBps']:.0f} MB/s\n"
        f"      cold load: {x['load_verify_map_s']:5.2f}s verify+map,"
        f" {x['load_and_copy_s']:6.2f}s with copy, "
        f"{x['load_MBps']:.0f} MB/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="124m,1b", help="presets, comma-separated (350m checks linearity)")
    ap.add_argument("--device", default="cpu", help="where the state lives: cuda makes save() stall on D2H")
    ap.add_argument("--root", default="/tmp/lmctl-ckpt-bench")
    ap.add_argument("--full-1b", action="store_true", help="1b with both moments (needs ~32 GB RAM)")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)

    base = disk_baseline(root)
    print(
        f"disk {root}: raw write+fsync {base['write_MBps']:.0f} MB/s, cold read {base['read_MBps']:.0f} MB/s"
    )
    print(f"state on {args.device}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = []
    for name in args.sizes.split(","):
        moments = 0 if name == "1b" and not args.full_1b else 2
        r = bench_one(name, root, moments, args.device)
        results.append(r)
        report(r)
        if moments < 2:
            results.append(extrapolate(r, moments))
            report(results[-1])
            print("      (1b: weights alone measured, to fit this machine's RAM; the second row is x3)")
    shutil.rmtree(root, ignore_errors=True)

    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "device": args.device,
        "load_average_1m": os.getloadavg()[0],
        "disk_baseline": base,
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
