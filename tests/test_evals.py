"""Evals: bits per byte against a hand computation, multiple-choice tasks at chance untrained and well above
it once trained, their results in metrics, status and plot, `lmctl eval` on a checkpoint, hub tasks through
`datasets` (a loopback hub), and one-line refusals."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from model.config import ConfigError, resolve
from model.decoder import Decoder
from model.evals import bits_per_byte, score_task, text_bytes
from model.metrics import read_metrics
from model.tasks import HUB_TASKS, Example, _arc, _piqa, load_task
from model.tokenizer import Tokenizer
from model.train import evaluate, setup_distributed, train


def test_text_bytes_leave_special_tokens_out(tiny_tokenizer):
    lengths = text_bytes(tiny_tokenizer, tiny_tokenizer.vocab_size + 5)
    assert lengths[tiny_tokenizer.eot_id] == 0 and lengths[-5:].tolist() == [0] * 5
    ids = tiny_tokenizer.encode("naïve café, ROMEO!")
    assert int(lengths[ids].sum()) == len("naïve café, ROMEO!".encode())


def test_bits_per_byte_is_the_loss_in_bits_over_the_text_bytes(tiny_tokenizer):
    """evaluate() against the definition, computed here from the logits: nats of the targets that are text,
    over ln 2 times their bytes (end-of-text targets are in the loss but not in bits per byte)."""
    cfg = resolve("tiny", ["model.vocab_size=2048"]).model
    torch.manual_seed(0)
    model = Decoder(cfg)
    text = "ROMEO: But soft, what light through yonder window breaks?"
    ids = tiny_tokenizer.encode(text)
    seq = torch.tensor([ids + [tiny_tokenizer.eot_id] + ids][:1])
    x, y = seq[:, :-1], seq[:, 1:]
    nbytes = text_bytes(tiny_tokenizer, cfg.vocab_size)
    loss, bpb = evaluate(model, [(x, y)], contextlib.nullcontext, setup_distributed("cpu"), nbytes)
    with torch.no_grad():
        logp = torch.log_softmax(model(x).float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    keep = nbytes[y] > 0
    assert loss == pytest.approx(float(-logp.mean()), rel=1e-5)
    assert bpb == pytest.approx(float(-logp[keep].sum()) / (math.log(2) * int(nbytes[y].sum())), rel=1e-5)
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    """tiny, 60 steps on the shipped corpus, evaluated (val, shakespeare_mc, samples) at 30 and 60."""
    data, _ = tiny_dataset
    run = tmp_path_factory.mktemp("trained")
    overrides = [f"data.path={data}", "train.steps=60", "train.eval_every=30", "train.log_every=30"]
    train(resolve("tiny", overrides), run)
    return run


def test_a_task_is_at_chance_untrained_and_well_above_it_after_training(trained, tiny_dataset):
    """The shipped task through the training loop: scored at evaluations into metrics.jsonl with val bits per
    byte and samples, at chance before the first step and well above it 60 steps later."""
    data, _ = tiny_dataset
    spec = resolve("tiny", [f"data.path={data}"])
    assert spec.train.evals == ["shakespeare_mc"] and spec.train.samples
    tok = Tokenizer.load(Path(data) / "tokenizer.json")
    examples = load_task("shakespeare_mc")
    torch.manual_seed(spec.train.seed)
    untrained = score_task(Decoder(spec.model), tok, examples, spec.model.seq_len, "cpu")
    assert untrained["chance"] == 0.25 and 0.15 <= untrained["acc"] <= 0.35, untrained

    metrics = read_metrics(trained / "metrics.jsonl")
    scored = [r for r in metrics if "evals" in r]
    assert [r["step"] for r in scored] == [30, 60]
    final = scored[-1]["evals"]["shakespeare_mc"]
    assert final["acc"] >= 0.55 and final["n"] == 200, final
    vals = [r for r in metrics if "val_loss" in r]
    assert all(2.0 < r["val_bpb"] < r["val_loss"] / math.log(2) for r in vals)  # > 1 byte per token
    assert vals[-1]["val_bpb"] < vals[0]["val_bpb"]
    (sampled,) = [r["samples"] for r in metrics if "samples" in r and r["step"] == 60]
    assert set(sampled) == set(spec.train.samples) and all(isinstance(t, str) for t in sampled.values())


def test_lmctl_eval_scores_a_checkpoint_and_status_and_plot_show_it(trained, tmp_path, capsys):
    """`lmctl eval` on a local run's committed checkpoint: the same score as in training at that step, added
    to metrics.jsonl, shown by status (with bits per byte and the samples) and drawn by plot."""
    import shutil

    from orchestrator import observe, runs
    from orchestrator.cli import main

    root = tmp_path / "runs"
    shutil.copytree(trained, root / "dev")
    record = runs.new_record("dev", "local", "finished", "tiny", "", 1, resolve("tiny"))
    record.checkpoints = str(root / "dev" / "checkpoints")
    runs.write_record(root / "dev", record)
    in_training = [r["evals"] for r in read_metrics(trained / "metrics.jsonl") if "evals" in r][-1]

    assert main(["eval", "dev", "--runs-dir", str(root), "--step", "60", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 60 and out["evals"] == in_training
    assert read_metrics(root / "dev" / "metrics.jsonl")[-1]["by"] == "lmctl eval"

    s = observe.run_summary(root / "dev")
    assert s["evals"]["shakespeare_mc"]["step"] == 60 and s["val_bpb"] > 0 and s["samples"]
    assert main(["status", "dev", "--runs-dir", str(root)]) == 0
    text = capsys.readouterr().out
    assert "val bpb" in text and "eval shakespeare_mc" in text and "sample 'ROMEO:'" in text
    png = observe.plot(root / "dev", tmp_path / "loss.png")
    assert png.stat().st_size > 10_000

    assert main(["eval", "dev", "--runs-dir", str(root), "--task", "nope"]) == 2
    assert "not a known task" in capsys.readouterr().err


def test_ranks_split_the_examples_and_add_up(tiny_tokenizer):
    cfg = resolve("tiny", ["model.vocab_size=2048"]).model
    torch.manual_seed(1)
    model = Decoder(cfg)
    examples = load_task("shakespeare_mc", 21)  # not a multiple of 2: rank 1 pads with a repeat
    whole = score_task(model, tiny_tokenizer, examples, cfg.seq_len, "cpu")
    parts = [
        score_task(model, tiny_tokenizer, examples, cfg.seq_len, "cpu", rank=r, world_size=2) for r in (0, 1)
    ]
    assert sum(p["acc"] for p in parts) == pytest.approx(whole["acc"])
    assert sum(p["chance"] for p in parts) == pytest.approx(whole["chance"])


def test_jsonl_tasks_refuse_bad_rows_in_one_line(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps({"context": "2 + 2 =", "choices": [" 4", " 5"], "label": 0}) + "\n\n")
    assert load_task(str(good)) == [Example("2 + 2 =", (" 4", " 5"), 0)]
    for row, says in [
        ({"context": "a", "choices": [" b"], "label": 0}, "2+ choices"),
        ({"context": "a", "choices": [" b", " c"], "label": 2}, "label that indexes"),
        ({"context": "a", "label": 0}, "not a {context, choices, label} row"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(ConfigError, match="line 1") as e:
            load_task(str(bad))
        assert says in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="hellaswag, arc_easy.*shakespeare_mc"):
        load_task("no-such-task")


def test_hub_tasks_map_their_fields():
    arc = {
        "question": "Which is a gas?",
        "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
        "answerKey": "B",
    }
    assert _arc(arc) == Example("Question: Which is a gas?\nAnswer:", (" ice", " steam"), 1)
    piqa = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "paint it", "label": 0}
    assert _piqa(piqa) == Example("Question: Open a jar\nAnswer:", (" twist the lid", " paint it"), 0)
    assert set(HUB_TASKS) >= {"hellaswag", "arc_easy", "piqa"}


def test_hellaswag_is_read_from_the_hub_through_datasets(tmp_path):
    """A hub task by name: the real `datasets` client against a loopback hub holding hellaswag's layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hubsim import FakeHub, use_endpoint

    folder = tmp_path / "hub" / "Rowan" / "hellaswag" / "data"
    folder.mkdir(parents=True)
    rows = {
        "ctx": ["A man sits down. He", "She opens the door and"],
        "endings": [["eats.", "flies."], ["walks in.", "melts."]],
    }
    rows["label"] = ["0", "0"]
    pq.write_table(pa.table(rows), folder / "validation-00000-of-00001.parquet")
    with FakeHub(tmp_path / "hub") as endpoint, use_endpoint(endpoint, home=tmp_path / "hf"):
        examples = load_task("hellaswag", limit=1)
    assert examples == [Example("A man sits down. He", (" eats.", " flies."), 0)]


def test_a_launch_refuses_an_unknown_task_before_writing_anything(tmp_path):
    from orchestrator.launch import launch

    with pytest.raises(ConfigError, match="eval task 'hellaswg' is not a known task"):
        launch("tiny", ["train.evals=[hellaswg]"], name="typo", root=tmp_path, dry_run=True)
    assert not (tmp_path / "typo").exists()
