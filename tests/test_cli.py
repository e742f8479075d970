"""The CLI: instant help, one-line errors with exit code 2, and nothing written on bad input."""

import json
import subprocess
import sys

import pytest

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
    assert main(["train", "--preset", "tiny", "--run-dir", str(run_dir), "--override", override]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err
    assert not run_dir.exists()


def test_unknown_preset_is_one_line(tmp_path, capsys):
    assert main(["train", "--preset", "7b", "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown preset '7b'" in capsys.readouterr().err
