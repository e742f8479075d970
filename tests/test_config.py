"""Presets, dotted overrides and validation messages."""

import pytest
import yaml

from model.config import (
    ConfigError,
    RunSpec,
    all_keys,
    flops_per_token,
    load_spec,
    matmul_params,
    param_count,
    preset_names,
    resolve,
)


def test_presets_resolve_with_expected_sizes():
    sizes = {name: param_count(resolve(name).model) for name in preset_names()}
    assert set(sizes) >= {"tiny", "124m", "350m", "1b"}
    assert 1e6 < sizes["tiny"] < 1e7
    assert 110e6 < sizes["124m"] < 135e6
    assert 320e6 < sizes["350m"] < 380e6
    assert 1.1e9 < sizes["1b"] < 1.3e9


@pytest.mark.parametrize(
    "override, path, value",
    [
        ("train.steps=123", ("train", "steps"), 123),
        ("train.lr=3e-4", ("train", "lr"), 3e-4),
        ("train.checkpoint_every=7", ("train", "checkpoint_every"), 7),
        ("train.global_batch_tokens=32768", ("train", "global_batch_tokens"), 32768),
        ("model.n_layers=2", ("model", "n_layers"), 2),
        ("model.d_model=192", ("model", "d_model"), 192),
        ("model.tie_embeddings=false", ("model", "tie_embeddings"), False),
        ("train.schedule=cosine", ("train", "schedule"), "cosine"),
        ("wandb.entity=me", ("wandb", "entity"), "me"),
    ],
)
def test_override_sets_field(override, path, value):
    assert getattr(getattr(resolve("tiny"), path[0]), path[1]) != value  # else an ignored override passes
    spec = resolve("tiny", [override])
    assert getattr(getattr(spec, path[0]), path[1]) == value


# A value unlike tiny's for keys whose generic choice (below) would not validate or is not a number.
OTHER_VALUE = {
    "model.d_model": 256,  # n_heads must divide it
    "model.n_heads": 8,  # head_dim 16 stays even
    "model.n_kv_heads": 1,
    "model.seq_len": 64,  # global_batch_tokens must stay a multiple of seq_len x micro_batch_size
    "train.global_batch_tokens": 4096,
    "train.micro_batch_size": 4,
    "data.dataset": "/elsewhere/corpus.jsonl",
    "data.subset": "sample-10BT",
    "data.split": "validation",
    "data.revision": "main",
    "data.text_field": "content",
    "data.tokenizer": "/elsewhere/tokenizer.json",
    "data.max_tokens": 1000,
    "data.path": "/elsewhere/staged",
    "wandb.project": "elsewhere",
    "wandb.entity": "me",
    "train.evals": ["hellaswag", "piqa"],  # a list of text: [a, b] in YAML
    "train.samples": ["Once upon a time"],
    "train.evals_every": 7,
    "train.init_from": "hf:/elsewhere/model",
    "train.mtbf_hours": 12.5,
    "train.checkpoint_cost_s": 30.0,
}


def _other_value(key: str, current):
    """A valid value for `key` that differs from tiny's `current` one."""
    if key in OTHER_VALUE:
        return OTHER_VALUE[key]
    section, field = key.split(".")
    choices = getattr(RunSpec.model_fields[section].annotation.model_fields[field].annotation, "__args__", ())
    if isinstance(current, bool):
        return not current
    if isinstance(current, str) and choices:  # a Literal: another of its choices
        return next(c for c in choices if c != current)
    if isinstance(current, int):
        return current + 1
    if isinstance(current, float):
        return current / 2
    raise AssertionError(f"no other value for {key} (tiny has {current!r}): add one to OTHER_VALUE")


def test_every_key_is_overridable():
    """Every key, each set to a value unlike the preset's: an override that is silently dropped fails."""
    base = resolve("tiny")
    for key in all_keys():
        section, field = key.split(".")
        current = getattr(getattr(base, section), field)
        value = _other_value(key, current)
        assert value != current, key
        text = str(value).lower() if isinstance(value, bool) else value
        spec = resolve("tiny", [f"{key}={text}"])
        assert getattr(getattr(spec, section), field) == value, key


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["train.stpes=5"], ["train.stpes", "did you mean train.steps"]),
        (["nope=1"], ["unknown override key 'nope'", "train.steps"]),
        (["train.lr=-1"], ["train.lr", "greater than 0", "-1"]),
        (["train.lr=fast"], ["train.lr", "valid number", "'fast'"]),
        (["model.d_model=90"], ["d_model (90)", "n_heads (4)"]),
        (["model.d_model=100"], ["head_dim", "25", "even"]),
        (["model.n_kv_heads=3"], ["n_heads (4)", "n_kv_heads (3)"]),
        (["train.steps"], ["key=value"]),
        (["train.global_batch_tokens=1000"], ["global_batch_tokens (1000)", "multiple of"]),
        (["train.schedule=linear"], ["train.schedule", "'cosine'", "'wsd'"]),
        (["train.warmup_steps=-5"], ["train.warmup_steps", "greater than or equal to 0"]),
        (["data.val_fraction=0.9"], ["data.val_fraction", "less than 0.5"]),
    ],
)
def test_bad_overrides_name_the_problem(overrides, fragments):
    with pytest.raises(ConfigError) as e:
        resolve("tiny", overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown preset .huge.*tiny"):
        resolve("huge")
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve("../configs/tiny")


def test_unknown_key_in_yaml_file_is_rejected(tmp_path):
    raw = yaml.safe_load(resolve("tiny").to_yaml())
    raw["train"]["learning_rate"] = 1.0
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train.learning_rate: unknown key; allowed: .*train.lr"):
        resolve(str(path))


def test_yaml_round_trip(tmp_path):
    spec = resolve("124m", ["train.steps=10"])
    path = tmp_path / "config.yaml"
    path.write_text(spec.to_yaml())
    assert load_spec(path) == spec


def test_grad_accum_divides_or_explains():
    spec = resolve("tiny", ["train.global_batch_tokens=8192"])  # 64 sequences, micro 8
    assert spec.grad_accum_steps(1) == 8
    assert spec.grad_accum_steps(2) == 4
    with pytest.raises(ConfigError, match="does not split over 3 workers"):
        spec.grad_accum_steps(3)


def test_flops_per_token_by_hand():
    m = resolve("124m").model
    layer = 2 * 768 * 768 + 2 * 768 * (4 * 64) + 3 * 768 * 2816
    n = 12 * layer + 32768 * 768
    assert matmul_params(m) == n
    assert flops_per_token(m) == 6 * n + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize("override", ["train.steps=true", "model.d_model=false", "train.lr=true"])
def test_a_boolean_is_not_a_number(override):
    """pydantic would read `train.steps=true` as 1 step."""
    with pytest.raises(ConfigError, match="must be a number, not"):
        resolve("tiny", [override])
