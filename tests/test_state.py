"""model/state.py: the training state captured, checkpointed and restored whole; "finished" without torch."""

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import COMMIT, Checkpointer
from model.config import resolve
from model.decoder import Decoder
from model.optim import build_optimizer
from model.state import STATE_KEYS, TrainingState, committed_step, outcome
from model.train import Dist

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.vocab_size=128", "model.d_model=32", "model.n_layers=1", "model.n_heads=2"]
SMALL += ["model.n_kv_heads=1", "model.d_ff=64", "model.seq_len=16", "train.async_checkpoint=true"]
ONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def fresh(spec, seed: int):
    torch.manual_seed(seed)
    raw = Decoder(spec.model)
    return raw, build_optimizer(raw, spec.train)


def a_step(raw, opt) -> None:
    x = torch.randint(0, 128, (2, 16))
    raw(x, x).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_capture_then_restore_gives_the_same_tensors_and_rng(tmp_path):
    spec = resolve("tiny", SMALL)
    raw, opt = fresh(spec, 1)
    for _ in range(2):
        a_step(raw, opt)
    commits = []
    state = TrainingState(tmp_path, spec, raw, opt, ONE, "ab" * 32, lambda s, secs: commits.append(s))
    saved, meta = copy.deepcopy(state.capture(2))
    assert sorted(saved) == sorted(STATE_KEYS)
    assert meta["step"] == 2 and meta["tokens"] == 2 * spec.train.global_batch_tokens
    assert meta["data"]["tokenizer_sha256"] == "ab" * 32 and meta["world_size"] == 1
    state.save(2)
    state.close()
    assert commits == [2]
    draw = lambda: (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    expected = draw()

    raw2, opt2 = fresh(spec, 7)  # other weights, no optimizer state, other RNG positions
    random.seed(9)
    np.random.seed(9)
    restored = TrainingState(tmp_path, spec, raw2, opt2, ONE, "ab" * 32)
    assert restored.restore() == 2
    assert draw() == expected
    now, _ = restored.capture(2)
    for k, v in saved["model"].items():
        assert torch.equal(now["model"][k], v), k
    for name, s in saved["optim"]["state"].items():
        for k, v in s.items():
            assert torch.equal(now["optim"]["state"][name][k], v), (name, k)
    tuples_as_lists = lambda g: {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}  # betas
    assert [tuples_as_lists(g) for g in now["optim"]["param_groups"]] == [
        tuples_as_lists(g) for g in saved["optim"]["param_groups"]
    ]


def test_restore_with_nothing_committed_is_step_0_and_leaves_the_model(tmp_path):
    spec = resolve("tiny", SMALL)
    raw, opt = fresh(spec, 1)
    before = copy.deepcopy(raw.state_dict())
    assert TrainingState(tmp_path / "none", spec, raw, opt, ONE, "").restore() == 0
    assert all(torch.equal(v, before[k]) for k, v in raw.state_dict().items())


def test_older_checkpoints_with_a_scheduler_state_still_restore(tmp_path):
    spec = resolve("tiny", SMALL)
    raw, opt = fresh(spec, 1)
    a_step(raw, opt)
    state, meta = TrainingState(tmp_path, spec, raw, opt, ONE, "").capture(1)
    Checkpointer(tmp_path).save(1, {**state, "sched": {"last_epoch": 1}}, meta)
    raw2, opt2 = fresh(spec, 3)
    assert TrainingState(tmp_path, spec, raw2, opt2, ONE, "").restore() == 1
    assert all(torch.equal(v, raw.state_dict()[k]) for k, v in raw2.state_dict().items())


def test_finished_means_the_last_step_is_committed(tmp_path):
    root = tmp_path / "checkpoints"
    assert committed_step(root) == 0 and outcome(root, 4) == ("stopped", 0)  # no folder at all
    c = Checkpointer(root)
    c.save(2, {"model": {"w": torch.zeros(2)}}, {})
    assert outcome(root, 4) == ("stopped", 2)
    c.save(4, {"model": {"w": torch.ones(2)}}, {})
    (c.step_dir(4) / COMMIT).unlink()  # step 4 written but not committed (killed before COMMIT)
    assert outcome(root, 4) == ("stopped", 2)
    (c.step_dir(4) / COMMIT).write_text(json.dumps({"step": 4, "files": {}}))
    assert outcome(root, 4) == ("finished", 4) and outcome(root, 5) == ("stopped", 4)


@pytest.mark.parametrize("committed", [False, True])
def test_outcome_does_not_import_torch(tmp_path, committed):
    if committed:
        Checkpointer(tmp_path).save(3, {"model": {"w": torch.zeros(1)}}, {})
    code = (
        "import sys; from model.state import outcome\n"
        f"print(outcome({str(tmp_path)!r}, 3)[0] == 'finished'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(committed), "False"], out.stderr
