"""Learning-rate schedules are pure functions of the step."""

import math

import pytest

from model.config import resolve
from model.optim import lr_at


def _train(**kw):
    over = [f"train.{k}={v}" for k, v in kw.items()]
    return resolve("tiny", over).train


def test_warmup_is_linear_to_peak():
    t = _train(steps=100, warmup_steps=10, lr=1e-3)
    assert lr_at(0, t) == pytest.approx(1e-4)
    assert lr_at(9, t) == pytest.approx(1e-3)


def test_cosine_ends_at_min_lr():
    t = _train(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(10, t) == pytest.approx(1e-3)
    assert lr_at(55, t) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, t) == pytest.approx(1e-4)
    lrs = [lr_at(s, t) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_wsd_holds_then_decays():
    t = _train(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, t) == lr_at(79, t) == pytest.approx(1e-3)
    assert lr_at(90, t) == pytest.approx(0.5e-3)
    assert lr_at(100, t) == pytest.approx(0.0)
