"""Mistakes caught by `lmctl launch` (and --dry-run) before anything is written or rented: a staged dataset
whose tokenizer outgrows the model's vocabulary, raw data without the text field. `--dataset` also takes a
staged dataset (a folder with manifest.json, or its store URI), and the staging flags are launch's own."""

from __future__ import annotations

import json
from pathlib import Path

from model.config import load_spec
from orchestrator.cli import main


def dry_run(capsys, runs_dir: Path, name: str, *args: str) -> tuple[int, str]:
    code = main(
        ["launch", "--config", "tiny", "--name", name, "--dry-run", "--runs-dir", str(runs_dir), *args]
    )
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_staged_dataset_is_trained_on_as_it_is_from_a_folder_or_a_uri(capsys, tmp_path, small_data):
    for name, given in (("folder", small_data), ("uri", f"file://{small_data}")):
        code, err = dry_run(capsys, tmp_path, name, "--dataset", given)
        assert code == 0, err
        assert load_spec(tmp_path / name / "config.yaml").data.path == given


def test_a_staged_tokenizer_larger_than_the_model_vocabulary_is_refused_at_launch(
    capsys, tmp_path, small_data
):
    code, err = dry_run(capsys, tmp_path, "small-vocab", "--dataset", small_data, "--vocab-size", "256")
    line = one_error_line(err)
    assert code == 2 and "tokenized with 512 tokens" in line and "vocabulary of 256" in line
    assert "--vocab-size 512" in line
    assert not (tmp_path / "small-vocab").exists()


def test_raw_data_without_the_text_field_is_refused_at_launch_and_text_field_fixes_it(capsys, tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"body": f"document {i}", "id": i}) + "\n" for i in range(3)))
    code, err = dry_run(capsys, tmp_path / "runs", "no-field", "--dataset", str(data))
    line = one_error_line(err)
    assert code == 2 and "no field 'text'" in line and "body, id" in line and "--text-field" in line
    assert not (tmp_path / "runs" / "no-field").exists()

    code, err = dry_run(capsys, tmp_path / "runs", "field", "--dataset", str(data), "--text-field", "body")
    assert code == 0, err
    spec = load_spec(tmp_path / "runs" / "field" / "config.yaml")
    assert (spec.data.dataset, spec.data.text_field) == (str(data), "body")


def test_launch_takes_the_staging_flags_as_config(capsys, tmp_path):
    flags = ["--max-tokens", "5M", "--split", "validation", "--vocab-size", "4096", "--subset", "en"]
    code, err = dry_run(capsys, tmp_path, "flags", "--dataset", "org/some-set", *flags)
    assert code == 0, err
    spec = load_spec(tmp_path / "flags" / "config.yaml")
    assert (spec.data.dataset, spec.data.max_tokens, spec.data.split) == (
        "org/some-set",
        5_000_000,
        "validation",
    )
    assert (spec.data.subset, spec.model.vocab_size) == ("en", 4096)
