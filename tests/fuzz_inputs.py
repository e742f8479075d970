"""Bad-input fuzzing of the lmctl CLI: hypothesis strategies over what users type, and one property.

A case is an argv for `orchestrator.cli.main`, run in this process inside a Sandbox: its own working
directory, runs folder, file store and cache, and a bucket on the loopback moto S3 server for s3:// URIs.
The property (`check_case`): every input is either accepted (an allowed exit code), or rejected cleanly:

  - a non-zero exit code, and no exception escaping main();
  - stderr is exactly one line, `error: <message>`, and the message names the offending flag, key or value.
    Malformed flag values that argparse itself refuses (`--workers abc`) get argparse's answer: its usage
    block, then one `lmctl VERB: error: argument --flag: ...` line, exit 2. That counts as clean too: it is
    argparse's fixed format, its last line names the flag, and it carries no traceback. Everything our own
    code validates must answer with the one `error:` line;
  - no "Traceback" anywhere in stdout or stderr;
  - nothing left behind: no new, changed or removed path anywhere in the sandbox (runs folder, store, cache,
    working directory), and the bucket holds the same objects as before.

An accepted input must also take effect (`_not_landed`): each `--override key=value` is in the config the
case wrote or printed, with the value the preset takes when that key is set to it; `--name`, `--store`,
`--workers`, `--gpu`, `--nodes`, `--spot`, `--disk-size` and `--dataset` are in the dry run's run.json or
config.yaml; `stage` puts a manifest under the store asked for, with the shard size and validation share
asked for; `plan` names `--price` as its price and quotes spot prices for `--spot`. Exit 0 alone would pass
an input that was silently dropped.

Some inputs must be rejected (`Case.must_reject`: path traversal in run names and store prefixes, zero,
negative and non-finite counts...): accepting one is a bug as well.

Verbs are chosen so that an accepted input starts nothing: `launch --dry-run` (renders runs/<name>/ and
launches nothing), `launch --print-config`, `plan`, `stage` of the sandbox's small jsonl files, and the run
verbs (status, logs, resume, ...) on runs that do not exist. What an accepted case wrote is removed before
the next case runs.

tests/test_fuzz.py runs every target under pytest; bench/chaos.py calls `run_fuzz`. Both check the same
`check_case`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from model.config import DEFAULT_CORPUS, all_keys, load_preset, parse_override, validate
from model.shards import read_jsonl_texts

ROOT = "@ROOT@"  # the sandbox folder, substituted when a case runs
BUCKET = "@BUCKET@"  # the sandbox's bucket on the loopback S3 server
FIX = f"{ROOT}/fixtures"
FIXTURE_RUN = "fixture-run-7f3a"  # an existing (dry-run) run in the sandbox; strategies never name it
LONG = "x" * 300  # longer than a file name may be (ENAMETOOLONG)


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    names: tuple[str, ...]  # a rejection's message must contain one of these: the flag, key or value
    files: tuple[tuple[str, bytes | None], ...] = ()  # written under <sandbox>/case/ first; None: a folder
    must_reject: str | None = None  # why accepting this input would be a bug
    ok_codes: tuple[int, ...] = (0,)  # exit codes that mean "accepted" (plan: 1 = does not fit)


@dataclass
class Verdict:
    kind: str  # "accepted", "rejected" or "skipped" (unsafe to run here, e.g. a store outside the sandbox)
    problem: str | None = None  # set when the case violates the property
    code: int | None = None
    stderr: str = ""
    argv: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"argv": self.argv, "problem": self.problem, "code": self.code, "stderr": self.stderr[-2000:]}


# ---------------------------------------------------------------- the sandbox


class Sandbox:
    """A temporary world for cases: env (runs, store, cache, hub offline, fake AWS), cwd, fixtures, bucket.

    Entering it changes os.environ and the working directory of this process; leaving restores both.
    """

    def __init__(self, s3_endpoint: str | None = None):
        self.s3_endpoint = s3_endpoint
        self.bucket: str | None = None

    def __enter__(self) -> Sandbox:
        self.tmp = Path(tempfile.mkdtemp(prefix="lmctl-fuzz-"))
        self.root = self.tmp / "sb"
        self.cwd = self.root / "cwd"
        self.runs = self.root / "runs"
        for d in (self.cwd, self.runs, self.root / "store", self.root / "cache"):
            d.mkdir(parents=True)
        self._env = dict(os.environ)
        self._old_cwd = os.getcwd()
        for var in ("LMCTL_FAULT", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(var, None)
        os.environ.update(
            LMCTL_RUNS_DIR=str(self.runs),
            LMCTL_STORE=f"file://{self.root / 'store'}",
            LMCTL_CACHE=str(self.root / "cache"),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            AWS_CONFIG_FILE=str(self.tmp / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.tmp / "no-aws-config"),
            AWS_EC2_METADATA_DISABLED="true",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        if self.s3_endpoint:
            os.environ["AWS_ENDPOINT_URL"] = self.s3_endpoint
        else:  # s3:// cases then fail fast on a port where nothing listens
            os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
        os.chdir(self.cwd)
        try:
            self._make_fixtures()
            if self.s3_endpoint:
                from s3 import make_bucket, s3_client

                self.bucket = make_bucket(self.s3_endpoint).bucket
                self._s3 = s3_client(self.s3_endpoint)
                self._s3.put_object(Bucket=self.bucket, Key="lmctl/keep.txt", Body=b"already here\n")
            self.baseline = self.state()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        os.chdir(self._old_cwd)
        os.environ.clear()
        os.environ.update(self._env)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _make_fixtures(self) -> None:
        from model.tokenizer import Tokenizer

        fx = self.root / "fixtures"
        shutil.rmtree(fx, ignore_errors=True)
        (fx / "data_dir" / "sub").mkdir(parents=True)
        (fx / "empty_dir").mkdir()
        (fx / "hidden_dir").mkdir()
        docs = [d[:2000] for d in read_jsonl_texts(DEFAULT_CORPUS)][:6]

        def jsonl(name: str, rows: list) -> None:
            (fx / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

        jsonl("ok.jsonl", [{"text": d} for d in docs])
        jsonl("content.jsonl", [{"content": d} for d in docs])
        jsonl("blank.jsonl", [{"text": ""}, {"text": None}])
        jsonl("numbers.jsonl", [{"text": 5}, {"text": 6}])
        jsonl("data_dir/a.jsonl", [{"text": d} for d in docs[:3]])
        jsonl("hidden_dir/.x.jsonl", [{"text": "hidden"}])
        (fx / "data_dir" / "sub" / "b.txt").write_text(docs[3])
        (fx / "empty.jsonl").write_text("")
        (fx / "garbage.jsonl").write_text("{not json\n]]\n")
        (fx / "corrupt.jsonl.gz").write_bytes(b"not gzip at all")
        (fx / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
        (fx / "bad.csv").write_text("text\nhello\n")
        (fx / "notatok.json").write_text("{}")
        Tokenizer.train(docs, 300).save(fx / "tok.json")
        (fx / "staged_bad").mkdir()
        (fx / "staged_bad" / "manifest.json").write_text(json.dumps({"format_version": 1, "train": "x"}))
        (fx / "staged_badjson").mkdir()
        (fx / "staged_badjson" / "manifest.json").write_text("{")
        (fx / "staged_bytes").mkdir()
        (fx / "staged_bytes" / "manifest.json").write_bytes(b"\xff\xfe\x00")
        if not (self.runs / FIXTURE_RUN).exists():
            out = run_cli(["launch", "--dry-run", "--config", "tiny", "--name", FIXTURE_RUN])
            assert out.code == 0, out

    # ------------------------------------------------------------ state: what is on disk and in the bucket

    def state(self) -> dict[str, tuple]:
        """Every path under the sandbox (files: size and mtime; folders) and every object in the bucket."""
        out: dict[str, tuple] = {}
        for dirpath, _, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            out[rel + "/"] = ("dir",)
            for name in filenames:
                st_ = os.lstat(os.path.join(dirpath, name))
                out[os.path.join(rel, name)] = (st_.st_size, st_.st_mtime_ns)
        if self.bucket:
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            for page in pages:
                for obj in page.get("Contents", []):
                    out[f"s3://{self.bucket}/{obj['Key']}"] = (obj["Size"], obj["ETag"])
        return out

    def reset(self) -> None:
        """Back to the baseline: what a case wrote is removed; a changed fixture is rebuilt."""
        now = self.state()
        for key in sorted(set(now) - set(self.baseline), key=len):
            if key.startswith("s3://"):
                self._s3.delete_object(Bucket=self.bucket, Key=key.split("/", 3)[3])
                continue
            path = self.root / key
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        now = self.state()
        if now != self.baseline:
            self._make_fixtures()
            if self.bucket:
                self._s3.put_object(Bucket=self.bucket, Key="lmctl/keep.txt", Body=b"already here\n")
            self.baseline = self.state()

    # ------------------------------------------------------------ cases

    def fill(self, text: str) -> str:
        return text.replace(ROOT, str(self.root)).replace(BUCKET, self.bucket or "no-bucket-here")

    def write_files(self, files) -> None:
        for rel, data in files:
            path = self.root / "case" / rel
            if data is None:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root.resolve())
        except (OSError, ValueError, RuntimeError):
            return False

    def unsafe(self, argv: list[str]) -> str | None:
        """Why running `argv` here could touch the world outside the sandbox, or start something real."""
        verb = argv[0] if argv else ""
        flags = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        if FIXTURE_RUN in argv[1:] and verb in ("resume", "stop", "attach", "generate", "export", "train"):
            return "acts on the fixture run"
        if verb == "launch" and "--dry-run" not in argv and "--print-config" not in argv:
            return "would launch a run"
        if verb in ("train", "attach") or (verb == "logs" and ("-f" in argv or "--follow" in argv)):
            return f"{verb} runs until stopped"
        if verb == "stage":
            from model.store import FileStore, open_store

            store = flags.get("--store")
            if store is not None:
                try:
                    opened = open_store(store)
                except Exception:  # noqa: BLE001 - refused before anything is written: safe
                    opened = None
                if isinstance(opened, FileStore) and not self._inside(opened.root):
                    return f"stages into {opened.root}, outside the sandbox"
            dataset = flags.get("--dataset", "")
            try:
                path = Path(dataset).expanduser()
                exists = bool(dataset) and path.exists()
            except (OSError, ValueError, RuntimeError):
                exists = False
            if exists and not self._inside(path):
                return f"reads {path}, outside the sandbox"
        return None


# ---------------------------------------------------------------- running and judging one case


@dataclass
class Ran:
    code: int | None
    out: str
    err: str
    escaped: str | None  # the traceback of an exception that escaped main()
    argparse_exit: bool = False


def run_cli(argv: list[str]) -> Ran:
    """orchestrator.cli.main(argv) in this process, stdout and stderr captured."""
    from orchestrator.cli import main

    out, err = io.StringIO(), io.StringIO()
    code, escaped, argparse_exit = None, None, False
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse refusing a flag (or --help)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            argparse_exit = True
        except Exception:  # noqa: BLE001 - an escaping exception is what this looks for
            escaped = traceback.format_exc()
    return Ran(code, out.getvalue(), err.getvalue(), escaped, argparse_exit)


def _variants(names: list[str]) -> list[str]:
    """What a message may show of a name: as given, stripped, lower-cased, repr-escaped, a prefix of it."""
    out = []
    for n in names:
        if not n:
            continue
        out += [n, n.strip(), n.strip().lower(), repr(n), repr(n)[1:-1]]
        out += [repr(n.strip()), repr(n.strip())[1:-1]]
        if n.startswith("--"):  # "--tokens-per-param" -> "tokens per param": "does not split over 3 workers"
            out.append(n[2:].replace("-", " "))
        number = _number(n)
        if number is not None and math.isfinite(number):  # "1_000" is shown as 1000, "-0" as -0.0
            out += [str(number), f"{number:g}"] + ([str(int(number))] if number == int(number) else [])
        out += [n[:40]] if len(n) > 40 else []
        out += [repr(n)[1:41]] if len(repr(n)) > 42 else []
    return [v for v in out if len(v) >= 3 or (v.startswith("'") and v.endswith("'"))]


def _message_problem(ran: Ran, names: list[str]) -> str | None:
    """None when stderr is a clean rejection naming one of `names`, else what is wrong with it."""
    lines = ran.err.rstrip("\n").split("\n")
    if ran.argparse_exit:
        if ran.code != 2 or not lines[0].startswith("usage: ") or "error: " not in lines[-1]:
            return "argparse exit that is not a usage error"
        if any(ln and not ln.startswith(" ") for ln in lines[1:-1]):
            return "argparse usage error with extra lines"
        message = lines[-1].split("error: ", 1)[1]
    else:
        if len(lines) != 1:
            return f"error is {len(lines)} lines, not one"
        if not lines[0].startswith("error: ") or not lines[0][len("error: ") :].strip():
            return "stderr is not one 'error: ...' line"
        message = lines[0]
    if not any(v.lower() in message.lower() for v in _variants(names)):
        return f"the message names none of {names[:6]}"
    return None


def _diff(before: dict, after: dict) -> list[str]:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k] and not k.endswith("/"))
    return [f"+{k}" for k in new] + [f"-{k}" for k in gone] + [f"~{k}" for k in changed]


def check_case(sb: Sandbox, case: Case) -> Verdict:
    """Run one case in the sandbox and judge it by the property in the module docstring."""
    argv = [sb.fill(a) for a in case.argv]
    names = [sb.fill(n) for n in case.names]
    why = sb.unsafe(argv)
    if why:
        return Verdict("skipped", None, argv=argv, stderr=why)
    try:
        sb.write_files(case.files)
        before = sb.state()
        ran = run_cli(argv)
        after = sb.state()
        left = _diff(before, after)
        missing = None
        if ran.code == 0 and not ran.argparse_exit and not ran.escaped and ran.code in case.ok_codes:
            missing = _not_landed(sb, argv, ran, set(after) - set(before))  # before reset clears it
    finally:
        sb.reset()
    verdict = Verdict("rejected", None, ran.code, ran.err, argv)
    if ran.escaped:
        verdict.problem = f"exception escaped main(): {ran.escaped.strip().splitlines()[-1]}"
        verdict.stderr = ran.err + ran.escaped
    elif "Traceback" in ran.out or "Traceback" in ran.err:
        verdict.problem = "a traceback was printed"
    elif ran.code in case.ok_codes and not ran.argparse_exit:
        verdict.kind = "accepted"
        if case.must_reject:
            verdict.problem = f"accepted, but must be rejected: {case.must_reject}"
        elif missing:
            verdict.problem = f"accepted, but did not take effect: {missing}"
    elif ran.code == 0:
        verdict.problem = "exit code 0 for an argparse exit"
    else:
        verdict.problem = _message_problem(ran, names)
        if verdict.problem is None and left:
            verdict.problem = f"rejected but left behind: {left[:5]}"
    return verdict


# ---------------------------------------------------------------- an accepted case took effect


def _flag(argv: list[str], flag: str) -> list[str]:
    """Every value given to `flag` (`--flag=value` or `--flag value`), in order; none after `--`."""
    out = []
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a.startswith(flag + "="):
            out.append(a[len(flag) + 1 :])
        elif a == flag and i + 1 < len(argv):
            out.append(argv[i + 1])
    return out


def _whole(value: str) -> int | None:
    """A count flag's value as the integer it names, or None where this cannot tell ('5k')."""
    n = _number(value)
    return int(n) if n is not None and math.isfinite(n) and n == int(n) else None


def _not_landed(sb: Sandbox, argv: list[str], ran: Ran, new: set[str]) -> str | None:
    """What an accepted (exit 0) case asked for that its config, record or output does not show; None if all.

    `new`: the sandbox paths the case created. Never raises: a failed check is the answer.
    """
    try:
        verb = argv[0]
        if verb == "launch" and "--print-config" in argv:
            return _spec_problem(argv, yaml.safe_load(ran.out))
        if verb == "launch" and "--dry-run" in argv:
            runs = [k for k in new if k.startswith("runs/") and k.endswith("/") and k.count("/") == 2]
            if len(runs) != 1:
                return f"{len(runs)} new run folders, not one"
            run = sb.root / runs[0]
            record = json.loads((run / "run.json").read_text())
            spec = yaml.safe_load((run / "config.yaml").read_text())
            return _spec_problem(argv, spec) or _record_problem(argv, record)
        if verb == "stage":
            return _staged_problem(argv, ran)
        if verb == "plan":
            out = " ".join(ran.out.split())  # rich wraps lines
            if _flag(argv, "--price") and "--price" not in out:
                return "--price is not the price quoted"
            if "--spot" in argv and "spot" not in out:
                return "--spot, but no spot price quoted"
        return None
    except Exception as e:  # noqa: BLE001 - a check that cannot read what was written fails the case
        return f"cannot read what it wrote: {type(e).__name__}: {e}"


def _spec_problem(argv: list[str], spec: dict) -> str | None:
    """Each --override key holds the value validating the preset with those keys set gives; --dataset too."""
    overrides = _flag(argv, "--override")
    if overrides:
        raw = load_preset(_flag(argv, "--config")[-1])
        keys = []
        for text in overrides:
            key, value = parse_override(text)
            section, _, name = key.partition(".")
            raw.setdefault(section, {})[name] = value
            keys.append((section, name))
        want = validate(raw).model_dump(mode="json")
        for section, name in keys:
            if spec[section][name] != want[section][name]:
                return (
                    f"{section}.{name} is {spec[section][name]!r}, not the override's {want[section][name]!r}"
                )
    for dataset in _flag(argv, "--dataset")[-1:]:
        as_override = {parse_override(f"data.{k}={dataset}")[1] for k in ("dataset", "path")}  # 'x\n' is x
        if not as_override & {spec["data"]["dataset"], spec["data"]["path"]}:
            return f"--dataset {dataset!r} is neither data.dataset nor data.path"
    return None


def _record_problem(argv: list[str], record: dict) -> str | None:
    """run.json of a dry run holds the flags that were given."""
    for flag, key in (("--name", "name"), ("--store", "store")):
        for value in _flag(argv, flag)[-1:]:
            if record[key] not in (
                value,
                value.rstrip("/") if key == "store" else value,
            ):  # s3://b/ is s3://b
                return f"{flag} {value!r} but run.json has {key} {record[key]!r}"
    for flag, key in (("--workers", "workers"), ("--nodes", "nodes"), ("--disk-size", "disk_size")):
        for value in _flag(argv, flag)[-1:]:
            if _whole(value) is not None and record[key] != _whole(value):
                return f"{flag} {value!r} but run.json has {key} {record[key]!r}"
    if "--spot" in argv and record["spot"] is not True:
        return "--spot but run.json has spot false"
    for value in _flag(argv, "--gpu")[-1:]:
        from orchestrator.gpus import find_gpu

        names, _, count = value.partition(":")
        got_names, _, got_count = (record["gpu"] or "").partition(":")
        want = {find_gpu(n).name for n in names.split(",")}
        if set(got_names.split(",")) != want or (_whole(count or "1") not in (None, _whole(got_count))):
            return f"--gpu {value!r} but run.json has gpu {record['gpu']!r}"
    return None


def _staged_problem(argv: list[str], ran: Ran) -> str | None:
    """`stage` printed data.path=<URI>: a manifest is there, under the store asked for, as asked for."""
    from model.shards import Manifest
    from model.store import open_store

    lines = [ln for ln in ran.out.split("\n") if ln.startswith("data.path=")]  # a path may hold a \r
    if not lines:
        return "no data.path= line in the output"
    uri = lines[-1].split("=", 1)[1]
    endpoint = (_flag(argv, "--endpoint-url") or [None])[-1]
    store = open_store((_flag(argv, "--store") or [os.environ["LMCTL_STORE"]])[-1], endpoint)
    if not uri.startswith(store.uri.rstrip("/") + "/"):
        return f"staged at {uri}, not under the store {store.uri}"
    if uri.startswith("file://"):  # read as a path: a folder `stage` accepted may hold a character
        raw = Path(uri[len("file://") :], "manifest.json").read_bytes()  # that a file:// URI may not
    else:
        raw = open_store(uri, endpoint).get_bytes("manifest.json")
    manifest = Manifest.model_validate_json(raw)
    for value in _flag(argv, "--shard-tokens")[-1:]:
        if _whole(value) is not None and manifest.shard_tokens != _whole(value):
            return f"--shard-tokens {value!r} but the manifest has shard_tokens {manifest.shard_tokens}"
    for value in _flag(argv, "--val-fraction")[-1:]:
        if _number(value) is not None and manifest.val_fraction != _number(value):
            return f"--val-fraction {value!r} but the manifest has val_fraction {manifest.val_fraction}"
    return None


# ---------------------------------------------------------------- strategies: values

_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # argv never holds NUL
TEXT = st.text(_CHARS, max_size=24)
WEIRD = [
    "",
    " ",
    "\t",
    "\n",
    "ü",
    "名前",
    "🚀",
    "\u202e",
    "\u200b",
    "\udcff",  # an undecodable byte of argv, as Python's surrogateescape presents it
    "-",
    "--",
    "-x",
    ".",
    "..",
    "/",
    "\\",
    "~",
    "x" * 300,
    "$HOME",
    "%s",
    "{}",
    "'",
    '"',
    "None",
    "null",
]
NUMBERS = [
    "0",
    "-1",
    "-0",
    "1",
    "3",
    str(10**30),
    str(-(10**30)),
    str(2**63),
    str(2**64),
    "1e400",
    "-1e400",
    "1e-400",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "infinity",
    "infk",
    "1.5",
    "0.5",
    "1e9",
    "1_000",
    "0x10",
    "1e",
    "abc",
    "١٢",
    "１２",
    "1,000",
    "+5",
    " 5 ",
    "5k",
    "-5M",
    "1e30",
]
NUMBER = st.one_of(
    st.sampled_from(NUMBERS),
    st.integers(-(10**40), 10**40).map(str),
    st.integers(-3, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
YAML_SNIPPETS = [
    "[1, 2]",
    "{a: 1}",
    "!!python/object/apply:os.system ['true']",
    "&a 1",
    "*a",
    "- x",
    "'unterminated",
    '"unterminated',
    "null",
    "~",
    "true",
    "yes",
    "off",
    "0o17",
    "0b11",
    "1:30",
    "2024-01-01",
    "2024-01-01T00:00:00",
    "!!binary aGVsbG8=",
    "|\n  block",
    "a\nb",
    "!!float 1",
    "!!int x",
    "!!timestamp 2024-13-45",
    "!!str 5",
    ".nan",
    ".inf",
    "-.inf",
    "1.0e+400",
    "=",
    "a=b",
    "#comment",
    "% x",
    "@x",
    "`x",
    "\t5",
    "? x",
]
VALUE = st.one_of(NUMBER, st.sampled_from(YAML_SNIPPETS), st.sampled_from(WEIRD), TEXT)


def _text_arg(flag: str, value: str) -> str:
    """`--flag=value`: the value reaches our code even when it starts with '-'."""
    return f"{flag}={value}"


# ---------------------------------------------------------------- target: overrides

KNOWN_KEYS = all_keys()
BAD_KEYS = ["", " ", ".", "train", "train.", ".steps", "train..steps", "train.steps.x", "steps", "foo.bar"]
BAD_KEYS += ["model.ü", "名前.x", "train.steps\n", "TRAIN.STEPS", "data.path.x", "__class__"]
BAD_KEYS += ["train.__dict__"]


def _mistyped(key: str) -> st.SearchStrategy[str]:
    section, _, name = key.partition(".")
    forms = [key.upper(), key[:-1], key + "s", key.replace(".", "_"), key.replace(".", ".."), " " + key]
    forms += [key + ".x", name, "." + key, key.replace("_", "-"), f"{section}s.{name}"]
    return st.sampled_from(forms)


OVERRIDE_KEY = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(BAD_KEYS),
    st.sampled_from(KNOWN_KEYS).flatmap(_mistyped),
    TEXT,
)
KEY_VALUES = {  # values that pass, or fail only at the deeper checks (files, the store)
    "data.dataset": [f"{FIX}/ok.jsonl", f"{FIX}/nope.jsonl", f"{FIX}/data_dir", "org/name"],
    "data.path": [f"{FIX}/staged_bad", f"{FIX}/staged_badjson", f"{FIX}/staged_bytes", f"{FIX}/nope"],
    "data.tokenizer": [f"{FIX}/tok.json", f"{FIX}/nope.json", f"{FIX}/ok.jsonl", "train"],
}
KEY_VALUES["data.path"] += [f"file://{FIX}/staged_bad", f"s3://{BUCKET}/nope", "s3://no-such-bucket-x/y"]
KEY_VALUES["data.path"] += [LONG, f"s3://{BUCKET}/{LONG}"]
KEY_VALUES["data.dataset"] += [f"{LONG}.jsonl", f"/{LONG}/x", " "]
KEY_VALUES["data.tokenizer"] += [f"{LONG}.json", " "]


@st.composite
def override_case(draw) -> Case:
    texts, names = [], ["--override", "override"]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(OVERRIDE_KEY)
        value = draw(st.one_of(VALUE, st.sampled_from(KEY_VALUES.get(key.strip(), ["1"]))))
        sep = draw(st.sampled_from(["=", "=", "=", " = ", ":", ""]))
        text = f"{key}{sep}{value}"
        texts.append(text)
        names += [text, key, f"{key.strip()!r}", value, key.strip().rpartition(".")[2]]
    verb = draw(st.sampled_from(["dry-run", "print-config", "plan"]))
    argv = {
        "dry-run": ["launch", "--dry-run", "--mode", "local", "--config", "tiny"],
        "print-config": ["launch", "--print-config", "--config", "tiny"],
        "plan": ["plan", "--gpu", "H100", "--config", "tiny"],
    }[verb]
    argv = [*argv, *(_text_arg("--override", t) for t in texts)]
    return Case(tuple(argv), tuple(names), ok_codes=(0, 1) if verb == "plan" else (0,))


# ---------------------------------------------------------------- target: presets

PRESET_NAMES = ["7b", "TINY", "tiny ", " tiny", "tiny.yaml", "tiny.yml", "../configs/tiny", "configs/tiny"]
PRESET_NAMES += ["/etc/passwd", "/nonexistent.yaml", "../../../../etc/hosts.yaml", "~/x.yaml", "./tiny"]
PRESET_NAMES += [f"{ROOT}/case", f"{ROOT}/nope.yaml", "tiny\n", "tiny/../tiny", "..yaml", ".yaml", "-.yaml"]
PRESET_NAMES += [LONG, f"{LONG}.yaml", f"/{LONG}/p.yaml"]
YAML_OBJECTS = [[], {}, "str", None, 10**30, -(10**30), -1, 0, float("nan"), float("inf"), float("-inf")]
YAML_OBJECTS += [True, 1.5, "ü名", "", "a\nb", 2**63, [1, [2]], {"a": {"b": 1}}, "1e400", "x" * 500]
YAML_TEXTS = [
    "",
    "[]",
    "5",
    "null",
    "- a",
    "{",
    "a: [",
    ":",
    "\t",
    "!!python/object/apply:os.system ['true']",
    "&a [*a]",
    "? [a]\n: b",
    "train: 1\ntrain: 2",
    "model: &m {d_model: 8}\ntrain: *m",
    "%YAML 9.9\n---\na: 1",
    "--- 1\n--- 2",
    "model:\n\t- x",
    "a" * 3000 + ":",
    "train: !!int x",
    "model: !!timestamp 2024-13-45",
]
YAML_BYTES = [b"\xff\xfe\x00m", b"model: caf\xe9", b"model:\x00", b"\xef\xbb\xbfmodel: 1", b"\x1b[31m: 1"]


@st.composite
def preset_case(draw) -> Case:
    files: tuple = ()
    names: list[str] = ["--config", "preset", "config"]
    must_reject = None
    kind = draw(st.sampled_from(["name", "name", "file", "file", "file", "text", "bytes", "folder"]))
    if kind == "name":
        config = draw(st.one_of(st.sampled_from(PRESET_NAMES), st.sampled_from(WEIRD), TEXT))
        if "/" in config and not config.endswith((".yaml", ".yml")):
            must_reject = "a preset name with '/' is not a preset (and not a .yaml path)"
    else:
        stem = draw(st.sampled_from(["p", "ü ñ", "-x", "a.b", " sp ", "x" * 100]))
        rel = f"{stem}{draw(st.sampled_from(['.yaml', '.yml']))}"
        if kind == "folder":
            files = ((rel, None),)
        elif kind == "text":
            files = ((rel, draw(st.sampled_from(YAML_TEXTS)).encode()),)
        elif kind == "bytes":
            files = ((rel, draw(st.sampled_from(YAML_BYTES))),)
        else:
            raw, touched = _mutated_preset(draw)
            names += touched
            files = ((rel, yaml.safe_dump(raw, allow_unicode=True, sort_keys=False).encode()),)
        config = draw(st.sampled_from([f"{ROOT}/case/{rel}", f"../case/{rel}"]))
        names += [rel, stem]
    names += [config, str(Path(config)) if config else ""]
    verb = draw(st.sampled_from(["dry-run", "print-config", "plan"]))
    argv = {
        "dry-run": ["launch", "--dry-run", "--mode", "local"],
        "print-config": ["launch", "--print-config"],
        "plan": ["plan", "--gpu", "H100"],
    }[verb]
    return Case(
        (*argv, _text_arg("--config", config)),
        tuple(names),
        files,
        must_reject,
        ok_codes=(0, 1) if verb == "plan" else (0,),
    )


def _mutated_preset(draw) -> tuple[dict, list[str]]:
    """The tiny preset with 1-2 mutations; returns it and the keys a message may name."""
    raw = load_preset("tiny")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    touched: list[str] = []
    for _ in range(draw(st.integers(1, 2))):
        what = draw(st.sampled_from(["unknown", "wrong", "wrong", "drop", "section", "key"]))
        key = draw(st.sampled_from(KNOWN_KEYS))
        section, _, name = key.partition(".")
        sec = raw.setdefault(section, {})
        if not isinstance(sec, dict):
            sec = raw[section] = {}
        if what == "unknown":
            bad = draw(st.sampled_from(["learning_rate", "d_modle", "ü", "x" * 80, "steps "]))
            sec[bad] = 1
            touched += [f"{section}.{bad}", bad]
        elif what == "wrong":
            sec[name] = draw(st.sampled_from(YAML_OBJECTS))
            touched += [key, name]
        elif what == "drop":
            sec.pop(name, None)
            touched += [key, name]
        elif what == "section":
            raw[section] = draw(st.sampled_from(YAML_OBJECTS))
            touched += [section]
        else:
            bad = draw(st.sampled_from([1, None, True, "a\nb", "", "名", 1.5]))
            target = draw(st.sampled_from(["top", "section"]))
            (raw if target == "top" else sec)[bad] = 1
            touched += [str(bad), repr(str(bad))[1:-1], section if target == "section" else "unknown key"]
    return raw, touched


# ---------------------------------------------------------------- target: run names

RUN_NAMES = ["../x", "a/b", ".", "..", "", "x" * 65, "x" * 64, "a..b", ".hidden", "-x", "--x", "x\n", "x "]
RUN_NAMES += [" x", "/abs", "a\\b", "ü", "名前", "🚀", "a\tb", "con", "nul", "...", "a/../b", "~", "~root"]
RUN_NAMES += ["$x", "*", "?"]
RUN_NAMES += ["run\u202e", "x\u200b", "\udcff", "a:b", "0", "_x", "x.", "-", "runs/../../etc"]


def _traversal(name: str) -> bool:
    return name in (".", "..") or "/" in name or "\\" in name or ".." in name or name.startswith(".")


@st.composite
def run_name_case(draw) -> Case:
    name = draw(st.one_of(st.sampled_from(RUN_NAMES), TEXT, st.text(_CHARS, min_size=60, max_size=80)))
    name = name if name != FIXTURE_RUN else name + "!"
    verbs = ["launch", "launch", "status", "logs", "resume", "stop", "plot", "export", "generate", "taken"]
    verb = draw(st.sampled_from(verbs))
    if verb == "taken":  # the name of a run that exists: refused, and nothing else printed (no cloud plan)
        cloud = draw(st.sampled_from([[], ["--gpu", "H100", "--store", f"s3://{BUCKET}/runs"]]))
        argv = ["launch", "--dry-run", "--config", "tiny", *cloud, "--name", FIXTURE_RUN]
        return Case(tuple(argv), (repr(FIXTURE_RUN),), must_reject="a run of that name exists")
    if verb == "launch":
        argv = ["launch", "--dry-run", "--mode", "local", "--config", "tiny", _text_arg("--name", name)]
    elif verb == "export":
        argv = ["export", "--hf", f"{ROOT}/case/hf", "--", name]
    else:
        argv = [verb, "--", name]
    must_reject = "path traversal in a run name" if _traversal(name) and name else None
    if verb == "status" and not name:
        must_reject = None  # `lmctl status ''` lists every run
    return Case(tuple(argv), (repr(name), "--name", "run name"), must_reject=must_reject)


# ---------------------------------------------------------------- target: GPU specs

GPU_NAMES = ["H100", "h100-sxm", "RTX5090", "rtx 4090", "A100-80GB", "B200", "H200", "L40S", "A6000"]
BAD_GPUS = ["", " ", ",", ":", "H100:", ":8", "H100:8:8", "H100:+8", "H100:٨", "H100:０８", "H100,,B200"]
BAD_GPUS += ["A,,B"]
BAD_GPUS += ["H100:1e1", "H100:0x8", "H100 : -1", "H100,H100", "h100,H100-SXM", "ü:1", "TPU:8", "H100;8"]
BAD_GPUS += ["H100:" + str(10**30), "H100:9999999999", "RTX5090,", ",RTX5090", "H100\n:8", "🚀"]
CLOUD_VALUES = ["aws", "AWS", " gcp ", "runpod", "lambda", "kubernetes", "azure", "", "ü", "aws,gcp", "local"]


@st.composite
def gpu_spec(draw) -> str:
    names = draw(st.lists(st.one_of(st.sampled_from(GPU_NAMES), TEXT), min_size=1, max_size=3))
    count = draw(st.one_of(st.none(), st.sampled_from(["0", "-1", "3", "16", str(10**9), "1", "8"]), TEXT))
    return ",".join(names) + ("" if count is None else f":{count}")


@st.composite
def gpu_case(draw) -> Case:
    from orchestrator.gpus import ConfigError, find_gpu

    spec = draw(st.one_of(st.sampled_from(BAD_GPUS), gpu_spec()))
    names = ["--gpu", spec]
    must_reject = "an empty --gpu" if not spec.strip() else None
    for part in spec.partition(":")[0].split(","):
        names.append(part)
        with contextlib.suppress(ConfigError):
            names.append(find_gpu(part).name)
    extra: list[str] = []
    if draw(st.booleans()):
        nodes = draw(st.sampled_from(["0", "-1", "2", "64", "65", str(10**9)]))
        extra.append(_text_arg("--nodes", nodes))
        names += ["--nodes", nodes]
        if int(nodes) < 1:
            must_reject = "--nodes below 1"
    if draw(st.booleans()):
        cloud = draw(st.one_of(st.sampled_from(CLOUD_VALUES), TEXT))
        extra.append(_text_arg("--cloud", cloud))
        names += ["--cloud", cloud, "cloud"]
    if draw(st.booleans()):
        extra.append("--spot")
        names += ["--spot", "spot"]
    if draw(st.integers(0, 3)) == 0:
        argv = ["launch", "--dry-run", "--config", "tiny", "--store", f"s3://{BUCKET}/runs"]
        if draw(st.booleans()):
            disk = draw(st.sampled_from(["0", "-5", "9", "10", "65537", str(10**12)]))
            extra.append(_text_arg("--disk-size", disk))
            names += ["--disk-size", disk]
            if not 10 <= int(disk) <= 65536:
                must_reject = "--disk-size outside 10..65536"
        ok = (0,)
    else:
        argv, ok = ["plan", "--config", "tiny"], (0, 1)
    return Case((*argv, _text_arg("--gpu", spec), *extra), tuple(names), must_reject=must_reject, ok_codes=ok)


# ---------------------------------------------------------------- target: store URIs

STORES = ["s3://", "s3:///x", "s3://b", "s3://bucket/../x", "s3://b/a/../../c", "s3://bucket//x"]
STORES += ["s3://bucket/./x", "s3://BUCKET/x", "s3://bu_cket/x", "s3://-bucket/x", "s3://bucket-/x"]
STORES += ["s3://bucket..x/y", "s3://192.168.0.1/x", "s3://" + "b" * 64, "s3:/bucket/x", "s3:bucket/x"]
STORES += ["S3://bucket/x", "file://relative", "file://", "file:///", "file:///data/../etc", "file:////x"]
STORES += ["ftp://host/x", "gs://bucket/x", "http://x", "", " ", "\t", "s3://bucket/pre fix", "s3://bucket/ü"]
STORES += [
    "file:",
    "s3:",
    "://x",
    "s3://bucket/a\nb",
    "s3://bucket?x=1",
    "s3://bucket#x",
    "s3://user@bucket/x",
]
STORES += [f"s3://{BUCKET}/../x", f"s3://{BUCKET}/a/./b", f"s3://{BUCKET}/..", f"s3://{BUCKET}/x/..", "/"]
STORES += [f"file://{ROOT}/store/../x", f"file://{ROOT}/./store", f"s3://{BUCKET}", f"s3://{BUCKET}/ok/"]
STORES += [f"{ROOT}/st ore", f"file://{ROOT}/ü", "relative/dir", "~", f"s3://{BUCKET}/名前"]
STORES += [f"{ROOT}/{LONG}", f"file://{ROOT}/{LONG}/x", LONG, f"s3://{BUCKET}/{LONG}", f"s3://{LONG}/x"]
ENDPOINTS = ["http://", "not a url", "ftp://x", "http://[::1", "http://127.0.0.1:1", "", "ü://x"]


def _store_must_reject(uri: str) -> str | None:
    if re.match(r"(s3|file):(?!//)", uri, re.IGNORECASE):
        return "a mistyped s3:// or file:// URI taken for a local folder"
    if uri.startswith(("s3://", "file://")):
        rest = uri.split("://", 1)[1]
        parts = rest.split("/")[1:] if uri.startswith("s3://") else rest.split("/")
        if any(p in (".", "..") for p in parts):
            return "path traversal in a store URI"
        if uri.startswith("file://") and not rest.startswith("/"):
            return "a file:// URI with a relative path"
    if not uri.strip():
        return "an empty store URI"
    if "://" in uri and not uri.startswith(("s3://", "file://")):
        return "an unsupported URI scheme"
    return None


@st.composite
def s3_uri(draw) -> str:
    bucket = draw(st.one_of(st.just(BUCKET), st.from_regex(r"[a-z0-9.\-_A-Z]{0,70}", fullmatch=True), TEXT))
    segments = st.one_of(st.sampled_from(["ok", "..", ".", "", "ü", "a b", "x" * 200]), TEXT)
    prefix = "/".join(draw(st.lists(segments, max_size=4)))
    return f"s3://{bucket}/{prefix}" if prefix or draw(st.booleans()) else f"s3://{bucket}"


@st.composite
def store_case(draw) -> Case:
    uri = draw(st.one_of(st.sampled_from(STORES), st.sampled_from(STORES), s3_uri(), TEXT))
    names = ["--store", uri, "store", "bucket", "URI"]
    if draw(st.booleans()):
        argv = ["launch", "--dry-run", "--mode", "local", "--config", "tiny", _text_arg("--store", uri)]
    else:
        argv = ["stage", f"--dataset={FIX}/ok.jsonl", f"--tokenizer={FIX}/tok.json", "--shard-tokens=2048"]
        argv.append(_text_arg("--store", uri))
        if draw(st.integers(0, 4)) == 0:
            endpoint = draw(st.one_of(st.sampled_from(ENDPOINTS), TEXT))
            argv.append(_text_arg("--endpoint-url", endpoint))
            names += ["--endpoint-url", endpoint, "endpoint"]
    return Case(tuple(argv), tuple(names), must_reject=_store_must_reject(sb_free(uri)))


def sb_free(text: str) -> str:
    """A placeholder-free stand-in for judging a value before the sandbox fills it in."""
    return text.replace(ROOT, "/sandbox").replace(BUCKET, "bucket")


# ---------------------------------------------------------------- target: dataset specs

DATASETS = [
    f"{FIX}/{n}"
    for n in ("ok.jsonl", "content.jsonl", "blank.jsonl", "numbers.jsonl", "empty.jsonl", "garbage.jsonl")
    + ("corrupt.jsonl.gz", "latin1.jsonl", "bad.csv", "data_dir", "empty_dir", "hidden_dir", "tok.json")
    + ("nope.jsonl", "nope", "data_dir/")
]
DATASETS += ["../fixtures/ok.jsonl", "../fixtures/nope/../ok.jsonl", "../../no-such/x.jsonl", "./x.jsonl"]
DATASETS += ["org/na me", "org//x", "-org/x", "org/x/y", "ørg/x", "org/", "/org", "a" * 200 + "/b", "org/.."]
DATASETS += ["someorg/somedata", "x", "~/nope.jsonl", "", " ", "org/x\n", "https://hf.co/datasets/x"]
DATASETS += ["名前/x", f"{LONG}.jsonl", f"{FIX}/{LONG}", f"org/{LONG}"]
STAGE_FLAGS = {
    "--text-field": st.one_of(st.sampled_from(["content", "text", "", " ", "ü", "meta", "id"]), TEXT),
    "--max-tokens": NUMBER,
    "--shard-tokens": NUMBER,
    "--val-fraction": NUMBER,
    "--vocab-size": NUMBER,
    "--tokenizer-sample-mb": NUMBER,
    "--tokenizer": st.sampled_from(
        ["train", f"{FIX}/tok.json", f"{FIX}/notatok.json", f"{FIX}/ok.jsonl", f"{FIX}/nope.json", FIX, ""]
        + [f"{FIX}/{LONG}.json", " "]
    ),
    "--subset": st.one_of(st.sampled_from(["", "sample-10BT", "ü"]), TEXT),
    "--split": st.one_of(st.sampled_from(["", "validation", "train[:10]", "ü"]), TEXT),
    "--revision": st.one_of(st.sampled_from(["", "main", "v1"]), TEXT),
}


@st.composite
def dataset_case(draw) -> Case:
    dataset = draw(st.one_of(st.sampled_from(DATASETS), st.sampled_from(DATASETS), TEXT))
    names = ["--dataset", dataset, Path(sb_free(dataset)).name, "dataset", "data.dataset"]
    if draw(st.integers(0, 3)) == 0:
        argv = ["launch", "--dry-run", "--mode", "local", "--config", "tiny", _text_arg("--dataset", dataset)]
        return Case(tuple(argv), tuple(names), must_reject=None if dataset.strip() else "an empty --dataset")
    argv = ["stage", _text_arg("--dataset", dataset)]
    flags = draw(st.lists(st.sampled_from(sorted(STAGE_FLAGS)), max_size=3, unique=True))
    if "--tokenizer" not in flags and draw(st.booleans()):
        argv.append(f"--tokenizer={FIX}/tok.json")  # no tokenizer training: faster accepted cases
    if "--shard-tokens" not in flags:
        argv.append("--shard-tokens=2048")
    if "--vocab-size" not in flags and "--tokenizer" not in flags:
        argv.append("--vocab-size=300")
    must_reject = None
    for flag in flags:
        value = draw(STAGE_FLAGS[flag])
        argv.append(_text_arg(flag, value))
        names += [flag, value, Path(sb_free(value)).name]
        if flag in ("--max-tokens", "--shard-tokens", "--vocab-size", "--tokenizer-sample-mb") and _bad_count(
            value
        ):
            must_reject = f"{flag} {value!r} is not a positive finite number"
    if draw(st.integers(0, 4)) == 0 and "--tokenizer-sample-mb" not in flags:
        argv.append(f"--store=s3://{BUCKET}/lmctl")
    return Case(tuple(argv), tuple(names), must_reject=must_reject)


def _number(value: str) -> float | None:
    try:
        return float(value.strip().replace("_", ""))
    except ValueError:
        return None


def _bad_count(value: str) -> bool:
    """A value no count flag may take: zero, negative, nan or infinite (unparseable ones fail anyway)."""
    n = _number(value)
    return n is not None and not (math.isfinite(n) and n > 0)


# ---------------------------------------------------------------- target: numeric flags

NUMERIC = {  # flag -> (argv prefix, "count": must be > 0 | "price": must be >= 0 | "fraction": in (0, 1])
    "--workers": (["launch", "--dry-run", "--mode", "local", "--config", "tiny"], "count"),
    "--nodes": (["plan", "--gpu", "H100", "--config", "tiny"], "count"),
    "--mfu": (["plan", "--gpu", "H100", "--config", "tiny"], "fraction"),
    "--price": (["plan", "--gpu", "H100", "--config", "tiny"], "price"),
    "--tokens": (["plan", "--gpu", "H100", "--config", "tiny"], "count"),
    "--tokens-per-param": (["plan", "--gpu", "H100", "--config", "tiny"], "count"),
    "--disk-size": (["launch", "--dry-run", "--gpu", "H100", "--store", f"s3://{BUCKET}/x"], "count"),
    "--max-tokens": (["stage", f"--dataset={FIX}/ok.jsonl", f"--tokenizer={FIX}/tok.json"], "count"),
    "--shard-tokens": (["stage", f"--dataset={FIX}/ok.jsonl", f"--tokenizer={FIX}/tok.json"], "count"),
    "--val-fraction": (["stage", f"--dataset={FIX}/ok.jsonl", f"--tokenizer={FIX}/tok.json"], "fraction"),
    "--vocab-size": (["stage", f"--dataset={FIX}/ok.jsonl"], "count"),
    "--tokenizer-sample-mb": (["stage", f"--dataset={FIX}/ok.jsonl", "--vocab-size=300"], "count"),
}


@st.composite
def numeric_case(draw) -> Case:
    flag = draw(st.sampled_from(sorted(NUMERIC)))
    value = draw(NUMBER)
    prefix, kind = NUMERIC[flag]
    n = _number(value)
    bad = n is not None and (
        not math.isfinite(n) or (n <= 0 if kind != "price" else n < 0) or (kind == "fraction" and n > 1)
    )
    ok = (0, 1) if prefix[0] == "plan" else (0,)
    return Case(
        (*prefix, _text_arg(flag, value)),
        (flag, value),
        must_reject=f"{flag} {value!r} is out of range" if bad else None,
        ok_codes=ok,
    )


TARGETS: dict[str, st.SearchStrategy[Case]] = {
    "overrides": override_case(),
    "presets": preset_case(),
    "run_names": run_name_case(),
    "gpu_specs": gpu_case(),
    "store_uris": store_case(),
    "datasets": dataset_case(),
    "numeric_flags": numeric_case(),
}


# ---------------------------------------------------------------- the bench's runner (no pytest)


@contextlib.contextmanager
def moto_endpoint() -> Iterator[str]:
    from s3 import start_moto

    server, endpoint = start_moto()
    try:
        yield endpoint
    finally:
        server.stop()


def fuzz_target(
    sb: Sandbox, strategy: st.SearchStrategy[Case], examples: int, seed: int
) -> dict[str, int | list]:
    """Draw `examples` cases (seeded), check each; never raises for a violation, lists it in "bad"."""
    stats: dict = {"tried": 0, "rejected_clean": 0, "accepted": 0, "skipped": 0, "bad": []}

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def body(case: Case) -> None:
        verdict = check_case(sb, case)
        if verdict.kind == "skipped":
            stats["skipped"] += 1
            return
        stats["tried"] += 1
        if verdict.problem:
            stats["bad"].append(verdict.to_dict())
        elif verdict.kind == "accepted":
            stats["accepted"] += 1
        else:
            stats["rejected_clean"] += 1

    body()
    return stats


def run_fuzz(
    examples_per_target: int = 200,
    seed: int = 0,
    targets: list[str] | None = None,
    s3_endpoint: str | None = None,
) -> dict[str, dict]:
    """{target: {"tried", "rejected_clean", "accepted", "skipped", "bad": [violations]}} over every target.

    Starts a loopback moto S3 server unless `s3_endpoint` is given. Call with tests/ on sys.path.
    """
    results = {}
    with contextlib.ExitStack() as stack:
        endpoint = s3_endpoint or stack.enter_context(moto_endpoint())
        sb = stack.enter_context(Sandbox(endpoint))
        for name in targets or list(TARGETS):
            t0 = time.perf_counter()
            results[name] = fuzz_target(sb, TARGETS[name], examples_per_target, seed)
            results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    return results


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="fuzz lmctl's CLI with bad input")
    ap.add_argument("--examples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", action="append")
    a = ap.parse_args()
    t0 = time.perf_counter()
    res = run_fuzz(a.examples, a.seed, a.target)
    for name, r in res.items():
        print(
            f"{name:14s} tried {r['tried']:4d}  rejected clean {r['rejected_clean']:4d}  "
            f"accepted {r['accepted']:4d}  skipped {r['skipped']:3d}  bad {len(r['bad'])}  {r['seconds']} s",
            file=sys.stderr,
        )
        for b in r["bad"][:20]:
            print("   ", json.dumps(b, ensure_ascii=False)[:600], file=sys.stderr)
    print(f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
