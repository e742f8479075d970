"""The reliability report: kills at random instants, storage faults, fuzzed bad input, canary secrets,
concurrency. Figures, never pass/fail on time; a property that does not hold is printed as a failure.

    python -m bench.chaos                       # everything: 16 kills over 4 runs + the rest, ~12 min
    python -m bench.chaos --quick               # 1 chaos run (5 kills), fewer faults and examples, ~6 min
    python -m bench.chaos --only kills          # or storage, fuzz, canary, concurrency (repeatable)
    python -m bench.chaos --seed 7              # another draw of instants, faults and inputs

- kills (tests/chaos.py): an uninterrupted reference run of the tiny preset (80 steps, 2 Ray workers,
  checkpoints every 20) launched at the same instant as a twin into one cold store; then runs each killed
  several times at seeded instants: SIGKILL of the whole session at a step or at a random time after the
  (re)start, inside a checkpoint write or inside staging (fault points that kill the whole session), of
  the driver alone, of one Ray worker; resumed after each. Reported: kills survived, failed, and missed
  (never landed: the run had finished, the process was gone, the fault point was never reached; counted
  apart, never as survived), steps redone per kill
  (highest logged step at the kill - checkpoint step the next start loaded), torn checkpoints loaded, runs
  whose losses equal the reference's bit for bit.
- storage (tests/chaos_storage.py): checkpoint uploads, metric pushes and shard downloads through a
  seeded fault proxy in front of a loopback S3 server (errors, resets, slow replies, writes cut half-way,
  torn objects), and a full local disk during a checkpoint write.
- fuzz (tests/fuzz_inputs.py): hypothesis-generated bad input to the CLI (overrides, presets, run names,
  GPU specs, store URIs, dataset specs), each checked for one clean line, a non-zero exit and nothing left;
  an accepted one for its effect (the override in the config written, the flag in run.json or the output).
- canary (tests/canary.py): canary secrets through every verb, then every byte the runs left scanned.
- concurrency: two `lmctl stage` of one dataset at once, from one machine and from two (two caches).

Written to bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import RESULTS_DIR, print_table, write_json

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import chaos  # noqa: E402  (tests/chaos.py: the harness the tests use)

SECTIONS = ("kills", "storage", "fuzz", "canary", "concurrency")
# Each run's kills in order (tests/chaos.py plan_kills draws their instants). A staging kill comes first:
# its run gets a cold store. Every kind appears at least twice in the full bench.
RUN_PLANS = [
    ["staging", "checkpoint", "session", "driver", "worker"],
    ["time", "time", "time"],
    ["checkpoint", "worker", "session", "driver"],
    ["staging", "time", "checkpoint", "time"],
]


def bench_kills(base: Path, seed: int, plans: list[list[str]]) -> dict[str, Any]:
    env = chaos.lab_env(base)
    store = ["--store", f"file://{base / 'pair-store'}"]
    t0 = time.monotonic()
    args = ["launch", "--config", "tiny", *chaos.SHORT, *store]
    cmd = [sys.executable, "-m", "orchestrator.cli", *args, "--name", "reference", "--foreground"]
    fg = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    twin = chaos.lmctl(env, *args, "--name", "twin")
    out, _ = fg.communicate(timeout=900)
    if fg.returncode != 0 or twin.returncode != 0:
        raise SystemExit(f"the reference run failed: {out[-2000:]}{twin.stderr}")
    reference = chaos.losses(env, "reference")
    chaos.lmctl(env, "logs", "twin", "-f", timeout=600)
    twin_ok = chaos.losses(env, "twin") == reference and chaos.status(env, "twin")["state"] == "finished"
    print(f"reference and twin: {time.monotonic() - t0:.0f} s, twin identical: {twin_ok}", flush=True)

    rng = random.Random(seed)
    done = []
    for i, kinds in enumerate(plans):
        plan = chaos.plan_kills(rng, kinds)
        extra = ["--store", f"file://{base / f'cold-{i}'}"] if kinds[0] == "staging" else []
        run = chaos.chaos_run(env, f"chaos-{i}", plan, reference, extra=extra)
        done.append(run)
        print(
            f"chaos-{i}: {len(run.kills)} kills, finished {run.finished}, identical {run.identical}, "
            f"redone {[k.redone for k in run.kills]}, {run.seconds:.0f} s",
            flush=True,
        )
    summary = chaos.summarize(done)
    summary["twin_identical"] = twin_ok
    return {"summary": summary, "runs": [r.to_dict() for r in done]}


def print_kills(res: dict[str, Any]) -> None:
    rows = []
    for run in res["runs"]:
        for k in run["kills"]:
            rows.append(
                {
                    "run": run["name"],
                    "kind": k["kind"],
                    "at": k["at"],
                    "logged": k["last_logged"],
                    "resumed": k["resumed_at"],
                    "redone": k["redone"],
                    "torn left": len(k["half_written"]),
                    "status": k["status_after"] or ("-" if k["missed"] else "(Ray)"),
                    "outcome": k["outcome"],
                    "s": k["seconds"],
                }
            )
    print("\nkills (each resumed; redone = highest logged step at the kill - checkpoint step loaded):")
    cols = [("run", "run", ""), ("kind", "kind", ""), ("instant", "at", "")]
    cols += [("logged", "logged", "d"), ("resumed at", "resumed", "d"), ("redone", "redone", "d")]
    cols += [("torn ckpts left", "torn left", "d"), ("status after", "status", "")]
    cols += [("to resume (s)", "s", ".1f"), ("outcome", "outcome", "")]
    print_table(rows, cols)
    s = res["summary"]
    missed = f" ({'; '.join(s['missed_why'])})" if s["missed"] else ""
    print(
        f"runs {s['runs']}, kills that landed {s['kills']}: survived {s['kills_survived']}, failed "
        f"{s['kills_failed']}; missed (never landed) {s['missed']}{missed}; "
        f"steps redone mean {s['steps_redone_mean']}, max {s['steps_redone_max']} "
        f"(interval {chaos.CHECKPOINT_EVERY}; over it: {s['over_one_interval']}, over two: "
        f"{s['over_two_intervals']}); torn checkpoints left by "
        f"kills {s['half_written_seen']}, loaded {s['torn_loaded']}; runs bit-identical "
        f"{s['runs_identical']}/{s['runs']}; twin launched at once identical: {s['twin_identical']}"
    )


def bench_concurrency(base: Path) -> dict[str, Any]:
    env = {k: v for k, v in chaos.lab_env(base).items() if k != "LMCTL_CACHE"}
    out = {}
    for machines in (1, 2):
        where = base / f"stage-{machines}"
        store = f"file://{where / 'store'}"
        out[f"{machines} machine(s)"] = chaos.stage_twice_at_once(env, store, machines, where)
    return out


def print_concurrency(res: dict[str, Any]) -> None:
    print("\ntwo `lmctl stage` of one dataset at the same instant into one store:")
    rows = [
        {
            "from": k,
            "exit": str(v["exit_codes"]),
            "reused": str(v["reused"]),
            "waited": v["waited"],
            "copies": len(v["copies"]),
            "ok": v["one_copy"] and v["verified"],
        }
        for k, v in res.items()
    ]
    cols = [("from", "from", ""), ("exit codes", "exit", ""), ("reused", "reused", "")]
    cols += [("waited", "waited", "d"), ("copies in store", "copies", "d"), ("one correct copy", "ok", "")]
    print_table(rows, cols)


def bench_storage(base: Path, seed: int, trials: int) -> list[dict[str, Any]]:
    import chaos_storage
    from s3 import start_moto

    server, endpoint = start_moto()
    try:
        return chaos_storage.run_all(endpoint, base, seed, trials)
    finally:
        server.stop()


def print_storage(res: list[dict[str, Any]]) -> None:
    print("\nstorage faults (loopback S3 behind a seeded fault proxy; a full disk of a real tmpfs):")
    rows = [
        {
            "scenario": r["scenario"],
            "faults": ", ".join(f"{k} {v}" for k, v in sorted(r["faults"].items())),
            "injected": sum(r["faults"].values()),
            "ops": r["ops"],
            "survived": r["survived"],
            "loud": r["failed_loudly"],
            "intact": r["previous_intact"],
            "violations": len(r["violations"]),
        }
        for r in res
    ]
    cols = [("scenario", "scenario", ""), ("faults injected", "faults", ""), ("total", "injected", "d")]
    cols += [("operations", "ops", "d"), ("succeeded", "survived", "d"), ("failed loudly", "loud", "d")]
    cols += [("previous ckpt intact", "intact", ""), ("broken promises", "violations", "d")]
    print_table(rows, cols)
    for r in res:
        if r.get("notes"):
            notes = r["notes"] if len(r["notes"]) <= 200 else r["notes"][:200] + "..."
            print(f"  {r['scenario']}: {notes}")
    for r in res:
        for v in r["violations"]:
            print(f"BROKEN PROMISE in {r['scenario']}: {v}")


def bench_fuzz(seed: int, examples: int) -> dict[str, dict]:
    import fuzz_inputs

    return fuzz_inputs.run_fuzz(examples, seed)


def print_fuzz(res: dict[str, dict]) -> None:
    print(
        "\nbad input, generated by hypothesis (rejected cleanly: one line, non-zero exit, nothing left on\n"
        "disk or in the bucket; accepted: it took effect, in the config, run.json or output;\n"
        "bad: either broken):"
    )
    rows = [
        {
            "target": k,
            **{f: v[f] for f in ("tried", "rejected_clean", "accepted", "seconds")},
            "bad": len(v["bad"]),
        }
        for k, v in res.items()
    ]
    total = {f: sum(r[f] for r in rows) for f in ("tried", "rejected_clean", "accepted", "bad")}
    rows.append({"target": "all", **total})
    cols = [("target", "target", ""), ("tried", "tried", "d"), ("rejected cleanly", "rejected_clean", "d")]
    cols += [("accepted", "accepted", "d"), ("bad", "bad", "d"), ("s", "seconds", ".0f")]
    print_table(rows, cols)
    for k, v in res.items():
        for bad in v["bad"][:5]:
            print(f"BAD in {k}: {bad}")


def bench_canary(base: Path) -> dict[str, Any]:
    import canary

    return canary.exercise(base).summary()


def print_canary(res: dict[str, Any]) -> None:
    scanned = (
        f"{res['files_scanned']} files ({res['bytes_scanned'] / 1e6:.1f} MB, "
        f"{res['expanded_bytes_scanned'] / 1e6:.1f} MB unpacked), {res['outputs_scanned']} command outputs, "
        f"{res['store_objects_scanned']} bucket objects, {res['process_cmdlines_read']} process command lines"
    )
    print(f"\ncanary secrets ({', '.join(res['canaries'])}) through {len(res['verbs'])} commands; scanned")
    print(f"{scanned}: canary leaks {res['canary_leaks']}")
    if res["verbs_not_as_expected"]:
        print(f"verbs that did not exit as expected: {res['verbs_not_as_expected']}")
    for leak in res["leaks"]:
        print(f"LEAK: {leak}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one chaos run, fewer faults and examples")
    ap.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args(argv)
    sections = args.only or list(SECTIONS)
    base = Path(tempfile.mkdtemp(prefix="lmctl-chaos-"))
    res: dict[str, Any] = {"seed": args.seed, "quick": args.quick}
    t0 = time.monotonic()
    try:
        if "kills" in sections:
            res["kills"] = bench_kills(base / "kills", args.seed, RUN_PLANS[:1] if args.quick else RUN_PLANS)
        if "storage" in sections:
            res["storage"] = bench_storage(base / "storage", args.seed, 2 if args.quick else 6)
        if "fuzz" in sections:
            res["fuzz"] = bench_fuzz(args.seed, 50 if args.quick else 300)
        if "canary" in sections:
            res["canary"] = bench_canary(base / "canary")
        if "concurrency" in sections:
            res["concurrency"] = bench_concurrency(base / "concurrency")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    res["seconds"] = round(time.monotonic() - t0, 1)
    print(f"\n=== reliability report (seed {args.seed}, {res['seconds']:.0f} s) ===")
    if "kills" in res:
        print_kills(res["kills"])
    if "storage" in res:
        print_storage(res["storage"])
    if "fuzz" in res:
        print_fuzz(res["fuzz"])
    if "canary" in res:
        print_canary(res["canary"])
    if "concurrency" in res:
        print_concurrency(res["concurrency"])
    path = write_json(RESULTS_DIR / "chaos.json", res)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
