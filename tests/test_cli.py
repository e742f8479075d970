"""The CLI: instant help, one-line errors with exit code 2, and nothing written on bad input."""

import json
import os
import subprocess
import sys

import pytest

from model.config import resolve
from orchestrator.cli import main


def test_presets_do_not_import_torch():
    code = "import sys; from orchestrator.cli import main; main(['presets', '--json']); "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    rows, loaded = out.rsplit("\n", 2)[0], out.split()[-1]
    assert loaded == "False"
    assert {r["preset"] for r in json.loads(rows)} >= {"tiny", "124m", "350m", "1b"}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.path=/nope", "no manifest.json in /nope"),
        ("train.stpes=3", "did you mean train.steps"),
        ("train.lr=-1", "train.lr"),
        ("model.n_kv_heads=3", "n_kv_heads (3)"),
    ],
)
def test_train_rejects_bad_input_and_writes_nothing(tmp_path, capsys, override, fragment):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--run-dir", str(run_dir), "--override", override]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err
    assert not run_dir.exists()


def test_train_takes_model_trains_flags_and_other_verbs_still_refuse_unknown_ones(capsys):
    with pytest.raises(SystemExit) as e:  # one flag set, model.train's, under lmctl's name
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: lmctl train") and "--run-config FILE" in out
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "tiny", "--run-dir", "x", "--profile", "0"])
    assert e.value.code == 2 and "whole number of steps >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["status", "--run-dir", "x"])
    assert e.value.code == 2 and "unrecognized arguments: --run-dir" in capsys.readouterr().err


def test_unknown_preset_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", "7b", "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown preset '7b'" in capsys.readouterr().err


# ---------------------------------------------------------------- runs: launch, status, and friends


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("LMCTL_RUNS_DIR", str(root))
    monkeypatch.delenv("LMCTL_STORE", raising=False)
    return root


def one_line_error(capsys, fragment: str) -> None:
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--config", "7b"], "unknown preset '7b'"),
        (["--override", "train.stpes=3"], "did you mean train.steps"),
        (["--override", "train.lr=fast"], "train.lr"),
        (["--override", "model.n_kv_heads=3"], "n_kv_heads (3)"),
        (["--override", "noequals"], "must look like key=value"),
        (["--name", "../evil"], "run name '../evil' is not allowed"),
        (["--name", "a/b"], "run name 'a/b' is not allowed"),
        (["--name", ""], "run name '' is not allowed"),
        (["--name", "sp ace"], "run name 'sp ace' is not allowed"),
        (["--name", "x" * 65], "is not allowed"),
        (["--workers", "0"], "--workers 0"),
        (["--workers", "3"], "does not split over 3 workers"),
        (["--override", "data.dataset=/no/such.jsonl"], "no such file or folder"),
        (["--override", "data.path=/nope"], "no manifest.json"),
        (["--store", "ftp://host/x"], "--store 'ftp://host/x'"),
    ],
)
def test_launch_rejects_bad_input_and_writes_nothing(runs_dir, capsys, args, fragment):
    assert main(["launch", "--mode", "local", "--config", "tiny", *args]) == 2
    one_line_error(capsys, fragment)
    assert not runs_dir.exists() or list(runs_dir.iterdir()) == []


def test_dry_run_renders_a_run_that_skypilot_accepts(runs_dir, capsys):
    import sky

    from orchestrator import runs

    assert resolve("tiny").train.steps != 7  # else an ignored --override passes
    assert (
        main(["launch", "--config", "tiny", "--name", "dry", "--dry-run", "--override", "train.steps=7"]) == 0
    )
    assert "nothing launched" in capsys.readouterr().out
    path = runs_dir / "dry"
    record = runs.read_record(path)
    assert (record.state, record.driver, record.steps, record.workers) == ("created", None, 7, 2)
    assert record.store == f"file://{runs_dir / 'store'}" and not (runs_dir / "store").exists()
    assert "steps: 7" in (path / "config.yaml").read_text()
    task = sky.Task.from_yaml(str(path / "task.yaml"))
    assert task.name == "dry" and task.envs["LMCTL_RUN"] == "dry" and "orchestrator.driver" in task.run
    assert (path / "run.json").stat().st_mode & 0o077 == 0  # run state is the owner's alone

    assert main(["launch", "--config", "tiny", "--name", "dry"]) == 2
    one_line_error(capsys, "run 'dry' already exists")
    assert runs.read_record(path).state == "created"  # untouched

    assert main(["status", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["name"], row["state"], row["steps"]) == ("dry", "created", 7)


def test_print_config_shows_the_resolved_spec_and_writes_nothing(runs_dir, capsys):
    assert resolve("tiny").train.lr != 0.001  # else an ignored --override passes
    assert (
        main(["launch", "--config", "tiny", "--override", "train.lr=0.001", "--wandb", "--print-config"]) == 0
    )
    import yaml

    spec = yaml.safe_load(capsys.readouterr().out)
    assert (
        spec["train"]["lr"] == 0.001 and spec["wandb"]["enabled"] is True and spec["model"]["d_model"] == 128
    )
    assert not runs_dir.exists()


@pytest.mark.parametrize(
    "verb",
    [
        ["logs", "ghost"],
        ["attach", "ghost"],
        ["resume", "ghost"],
        ["stop", "ghost"],
        ["status", "ghost"],
        ["generate", "ghost"],
        ["export", "ghost", "--hf", "out"],
        ["plot", "ghost"],
        ["logs", "../x"],
        ["status", ""],  # a bad name, not "every run"
    ],
)
def test_verbs_on_a_missing_run_say_so(runs_dir, capsys, verb):
    assert main(verb) == 2
    one_line_error(capsys, "no run named" if verb[1] == "ghost" else "is not allowed")
    assert not runs_dir.exists()


@pytest.mark.parametrize("argv", [["--help"], ["status"], ["status", "--json"], ["launch", "--help"]])
def test_help_and_status_import_no_torch_ray_or_sky(tmp_path, argv):
    code = "\n".join(
        [
            "import sys",
            "from orchestrator.cli import main",
            "try:",
            f"    main({argv!r})",
            "except SystemExit:",
            "    pass",
            "print('HEAVY', sorted(m for m in ('torch', 'ray', 'sky', 'datasets') if m in sys.modules))",
        ]
    )
    env = {**os.environ, "LMCTL_RUNS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"
