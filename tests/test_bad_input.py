"""Bad input to the run verbs is one line and exit code 2, with nothing written; `export` never removes or
moves what it did not write; a closed stdout, a mistyped verb or flag and Ctrl-C during `stage` are answered
in one line too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import resolve
from orchestrator.cli import main

REPO = Path(__file__).resolve().parent.parent
RUN = "dev"
TINY_4_STEPS = [  # tiny, 4 steps, a checkpoint every 2 and only the last kept: step 2 is pruned
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=100",
    "train.eval_batches=1",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=1",
    "train.async_checkpoint=false",
]


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert all(f in err for f in fragments), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def argparse_error(capsys, argv: list[str]) -> str:
    """The last line of argparse's refusal (its usage block comes first), after checking exit code 2."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def write_run(root: Path, name: str, checkpoints: str) -> Path:
    """A finished local run's record whose checkpoints are at `checkpoints`."""
    from orchestrator.runs import RunRecord, write_record

    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    write_record(path, RunRecord(name, "local", "finished", "tiny", 0.0, 0.0, "file:///unused", checkpoints))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dataset) -> Path:
    """A runs folder with run `dev`: tiny trained 4 steps in this process, committed steps [4]."""
    from model.train import train

    root = tmp_path_factory.mktemp("runs")
    path = write_run(root, RUN, str(root / RUN / "checkpoints"))
    train(resolve("tiny", [*TINY_4_STEPS, f"data.path={tiny_dataset[0]}"]), path, device="cpu")
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in folder.rglob("*")}


# ---------------------------------------------------------------- export never destroys anything


def export(runs: Path, out: Path, *extra: str) -> int:
    return main(["export", RUN, "--runs-dir", str(runs), "--hf", str(out), *extra])


def test_export_refuses_a_file_and_leaves_it_alone(runs, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("my notes\n")
    assert export(runs, readme) == 2
    one_line_error(capsys, "README.md' is a file; choose a new folder")
    assert snapshot(tmp_path) == {"README.md": b"my notes\n"}  # not renamed aside, nothing beside it


def test_export_refuses_a_folder_that_is_not_an_export(runs, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.txt").write_text("keep me")
    before, runs_before = snapshot(tmp_path), snapshot(runs)
    assert export(runs, tmp_path / "mine") == 2
    one_line_error(capsys, "mine' is not empty and holds no lmctl export; choose a new folder")
    assert export(runs, runs) == 2  # a mistyped `--hf runs` takes nothing away
    one_line_error(capsys, "is not empty and holds no lmctl export")
    assert snapshot(tmp_path) == before and snapshot(runs) == runs_before


def test_export_marks_itself_and_is_replaced_only_with_force(runs, tmp_path, capsys):
    out = tmp_path / "exports" / "deep" / RUN  # missing parents are created
    assert export(runs, out) == 0
    marker = json.loads((out / "lmctl_export.json").read_text())
    assert (marker["run"], marker["step"]) == (RUN, 4)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    (out / "note.txt").write_text("added after the export")
    capsys.readouterr()

    assert export(runs, out) == 2
    one_line_error(capsys, f"holds an lmctl export of run {RUN} step 4: add --force to replace it")
    assert (out / "note.txt").exists()

    assert export(runs, out, "--force") == 0
    assert not (out / "note.txt").exists() and (out / "lmctl_export.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [RUN]  # no temporary or old folder left


def test_export_into_an_empty_folder(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    assert export(runs, tmp_path / "empty") == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_a_failed_replacement_puts_the_previous_export_back(runs, tmp_path, monkeypatch):
    from model import export_hf

    out = tmp_path / "hf"
    assert export(runs, out) == 0
    before = snapshot(out)
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".hf.tmp-"):
            raise OSError(5, "Input/output error")  # the new export cannot be put in place
        return real_rename(self, target)

    monkeypatch.setattr(export_hf.Path, "rename", rename)
    with pytest.raises(OSError):
        export(runs, out, "--force")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


EXPORT_ONE = """
import sys, torch
from model.config import ModelConfig
from model.decoder import Decoder
from model.export_hf import export_hf
torch.manual_seed(int(sys.argv[2]))
cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, seq_len=16)
export_hf(Decoder(cfg).state_dict(), cfg, sys.argv[1], force=True, origin={"step": int(sys.argv[2])})
"""


def complete_exports(folder: Path) -> dict[int, dict[str, bytes]]:
    """Step -> files, of every export in `folder` (visible or hidden) whose every file is there."""
    out = {}
    for d in folder.iterdir():
        files = {"config.json", "generation_config.json", "model.safetensors", "lmctl_export.json"}
        if d.is_dir() and files <= {p.name for p in d.iterdir()}:
            out[json.loads((d / "lmctl_export.json").read_text())["step"]] = snapshot(d)
    return out


@pytest.mark.parametrize("instant", [1, 2])
def test_a_crash_while_replacing_leaves_an_export_whole(tmp_path, instant):
    """SIGKILL with the old export aside and the new one not in yet (1), or both in place (2)."""
    out = tmp_path / "hf"
    run = lambda step, fault="": subprocess.run(  # noqa: E731
        [sys.executable, "-c", EXPORT_ONE, str(out), str(step)],
        cwd=REPO,
        env={**os.environ, "LMCTL_FAULT": fault},
        capture_output=True,
    )
    assert run(1).returncode == 0
    old = snapshot(out)
    assert run(2, f"export.replace:{instant}").returncode == -9
    survivors = complete_exports(tmp_path)
    assert survivors[1] == old and 2 in survivors  # the old export whole (aside), the new one whole too
    if instant == 2:
        assert json.loads((out / "lmctl_export.json").read_text())["step"] == 2
    (tmp_path / ".hf.notes").mkdir()  # hidden, but not a name an export gives: not ours to remove
    assert run(3).returncode == 0  # the next export clears what the killed one left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.notes", "hf"]
    assert json.loads((out / "lmctl_export.json").read_text())["step"] == 3


# ---------------------------------------------------------------- generate, export, plot: bad values


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--top-k", "0", "whole number of tokens >= 1"),
        ("--max-tokens", "0", "whole number of tokens >= 1"),
        ("--max-tokens", "-5", "whole number of tokens >= 1"),
        ("--temperature", "-1", "give a number >= 0"),
        ("--temperature", "nan", "give a number >= 0"),
        ("--top-p", "2", "give a number in (0, 1]"),
        ("--top-p", "inf", "give a number in (0, 1]"),
        ("--top-p", "0", "give a number in (0, 1]"),
    ],
)
def test_generate_refuses_sampling_settings_out_of_range(runs, capsys, flag, value, allowed):
    line = argparse_error(capsys, ["generate", RUN, "--runs-dir", str(runs), flag, value])
    assert f"argument {flag}: '{value}'" in line and allowed in line


@pytest.mark.parametrize(
    "setting", [{"top_k": 0}, {"temperature": float("nan")}, {"top_p": 2.0}, {"max_new_tokens": -1}]
)
def test_sample_refuses_settings_out_of_range(runs, setting):
    from model.inference import load_trained, sample

    (name,) = setting
    with pytest.raises(ValueError, match=name):
        sample(load_trained(runs / RUN), "ROMEO:", **setting)


def test_generate_samples_with_good_settings(runs, capsys):
    argv = ["generate", RUN, "--runs-dir", str(runs), "--max-tokens", "5", "--top-p", "0.9", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4


def test_generate_refuses_more_tokens_than_the_model_can_hold(runs, capsys):
    """1e9 new tokens once died allocating the KV cache; the limit is 4 x the trained context."""
    assert main(["generate", RUN, "--runs-dir", str(runs), "--max-tokens", "1000000000"]) == 2
    one_line_error(capsys, "--max-tokens 1000000000", "4 x the model's trained context")


@pytest.mark.parametrize("step", ["999", "2", "-1"])  # never saved, pruned, nonsense
@pytest.mark.parametrize("verb", ["generate", "export"])
def test_a_step_that_is_not_committed_names_the_ones_that_are(runs, tmp_path, capsys, verb, step):
    extra = ["--hf", str(tmp_path / "hf")] if verb == "export" else []
    assert main([verb, RUN, "--runs-dir", str(runs), "--step", step, *extra]) == 2
    one_line_error(capsys, f"step {step} is not a committed checkpoint", "committed steps: 4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", ["generate", "export"])
def test_a_bucket_without_credentials_is_one_line(tmp_path, capsys, monkeypatch, s3_server, s3_env, verb):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # loopback: nothing could leave the machine
    monkeypatch.setenv("LMCTL_CACHE", str(tmp_path / "cache"))
    write_run(tmp_path / "runs", "cloudy", "s3://some-bucket/lm/runs/cloudy/checkpoints")
    extra = ["--hf", str(tmp_path / "hf")] if verb == "export" else []
    assert main([verb, "cloudy", "--runs-dir", str(tmp_path / "runs"), *extra]) == 2
    one_line_error(capsys, "no usable S3 credentials for s3://some-bucket", "AWS_ACCESS_KEY_ID")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_plot_creates_missing_folders(runs, tmp_path, capsys):
    out = tmp_path / "missing" / "dir" / "loss.png"
    assert main(["plot", RUN, "--runs-dir", str(runs), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "out, fragment",
    [
        ("{tmp}", "is a folder: give a file path"),
        ("{tmp}/a-file/loss.png", "cannot create the folder"),
        ("/proc/loss.png", "cannot write /proc/loss.png"),
    ],
)
def test_plot_refuses_an_out_it_cannot_write(runs, tmp_path, capsys, out, fragment):
    (tmp_path / "a-file").write_text("x")
    assert main(["plot", RUN, "--runs-dir", str(runs), "--out", out.format(tmp=tmp_path)]) == 2
    one_line_error(capsys, fragment)
    assert snapshot(tmp_path) == {"a-file": b"x"}


# ---------------------------------------------------------------- every verb: closed stdout, typos


def test_a_closed_stdout_ends_quietly():
    """`lmctl presets --json | head -1`: the reader is gone before lmctl writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        cmd = [sys.executable, "-m", "orchestrator.cli", "presets", "--json"]
        done = subprocess.run(cmd, cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, b"")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["stauts"], "unknown verb 'stauts'; did you mean 'status'?"),
        (["xyzzy"], "unknown verb 'xyzzy'; verbs: launch, status,"),
        (["launch", "--dry-rnu"], "unrecognized arguments: --dry-rnu; did you mean --dry-run?"),
        (
            ["launch", "--mode", "lcoal"],
            "invalid choice: 'lcoal' (choose from 'local', 'cloud'); did you mean 'local'?",
        ),
        (
            ["generate", RUN, "--top-kk=5"],
            "unrecognized arguments: --top-kk=5; did you mean --top-k or --top-p?",
        ),
    ],
)
def test_a_mistyped_verb_or_flag_gets_the_nearest_one(capsys, argv, message):
    assert message in argparse_error(capsys, argv)


# ---------------------------------------------------------------- Ctrl-C during stage


def test_ctrl_c_during_stage_says_what_is_kept_and_the_same_command_continues(
    tmp_path, capsys, monkeypatch, corpus_texts, tiny_tokenizer
):
    from orchestrator import stage_unit as stage

    monkeypatch.setenv("LMCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:2]))
    tiny_tokenizer.save(tmp_path / "tokenizer.json")
    store = tmp_path / "store"
    argv = ["stage", "--dataset", str(data), "--tokenizer", str(tmp_path / "tokenizer.json")]
    argv += ["--store", str(store), "--shard-tokens", "2K", "--max-tokens", "2e4", "--json"]

    submit, calls = stage.Uploader.submit, []

    def ctrl_c_at_the_third_shard(self, path, info):
        calls.append(info.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        submit(self, path, info)

    monkeypatch.setattr(stage.Uploader, "submit", ctrl_c_at_the_third_shard)
    assert main(argv) == 130
    err = one_line_error(
        capsys, "interrupted: kept in file://", "the tokenizer and 2 shards", "same command again"
    )
    (folder,) = (store / "datasets").iterdir()
    assert str(folder) in err
    assert sorted(p.name for p in folder.iterdir()) == sorted(["tokenizer.json", *calls[:2]])  # no manifest

    monkeypatch.setattr(stage.Uploader, "submit", submit)
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result["skipped"]) == sorted(calls[:2]) and "manifest.json" in result["uploaded"]
