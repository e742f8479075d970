"""Bad input, generated: every rejection is one `error:` line naming the problem, a non-zero exit, no
traceback, and nothing left on disk or in the bucket; every accepted input takes effect (its override is in
the config written, its flag in run.json or the output) (tests/fuzz_inputs.py: strategies and the property).

Each target runs a few dozen derandomized examples here; bench/chaos.py runs hundreds through run_fuzz.
The @example cases are inputs that once broke the property, kept so they stay fixed.
"""

import pytest
from fuzz_inputs import BUCKET, FIX, FIXTURE_RUN, LONG, TARGETS, Case, Sandbox, check_case, run_fuzz
from hypothesis import HealthCheck, example, given, settings

from model.config import ConfigError, load_spec

EXAMPLES = 25
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
LOCAL = ("launch", "--dry-run", "--mode", "local", "--config", "tiny")
CLOUD = ("launch", "--dry-run", "--config", "tiny", "--gpu", "H100", "--store", f"s3://{BUCKET}/runs")
PLAN = ("plan", "--gpu", "H100", "--config", "tiny")
PRINT = ("launch", "--print-config", "--config", "tiny")
NEWLINE_KEY = b'train: {"a\\nb": 1}'  # a key with a newline in it
STAGE = ("stage", f"--dataset={FIX}/ok.jsonl", f"--tokenizer={FIX}/tok.json", "--shard-tokens=2048")


@pytest.fixture(scope="module")
def sb(s3_server):
    with Sandbox(s3_server) as sandbox:
        yield sandbox


def clean(sb: Sandbox, case: Case) -> str:
    verdict = check_case(sb, case)
    assert verdict.problem is None, verdict.to_dict()
    return verdict.kind


def case(*argv: str, names=(), files=(), must_reject="a regression", ok_codes=(0,)) -> Case:
    return Case(tuple(argv), tuple(names), tuple(files), must_reject, ok_codes)


@FUZZ
@given(c=TARGETS["overrides"])
@example(c=case(*LOCAL, "--override=data.path=" + f"{FIX}/staged_bad", names=["data.path", "manifest"]))
@example(c=case(*LOCAL, "--override=model.rope_theta=.inf", names=["model.rope_theta"]))
@example(c=case(*LOCAL, f"--override=data.tokenizer={FIX}/nope.json", names=["data.tokenizer"]))
@example(c=case(*LOCAL, "--override=model.vocab_size=!!int x", names=["model.vocab_size"]))
@example(c=case(*LOCAL, f"--override=data.path={LONG}", names=["data.path"]))
# accepted, so they must land: the last of a key wins, ' = ' is '=', YAML's off is false, 2024 as text
@example(c=case(*LOCAL, "--override=train.steps=7", "--override=train.steps = 9", must_reject=None))
@example(
    c=case(*PRINT, "--override=model.tie_embeddings=off", "--override=wandb.entity=2024", must_reject=None)
)
def test_overrides(sb, c):
    clean(sb, c)


@FUZZ
@given(c=TARGETS["presets"])
@example(c=case(*LOCAL, "--config=@ROOT@/case/p.yaml", names=["p.yaml"], files=[("p.yaml", b"\xff\xfe")]))
@example(c=case(*PLAN, "--config=@ROOT@/case/p.yml", names=["p.yml"], files=[("p.yml", b"model:\x00")]))
@example(c=case(*PLAN, "--config=@ROOT@/case/p.yml", names=["p.yml"], files=[("p.yml", b"\t")]))
@example(c=case(*LOCAL, "--config=@ROOT@/case/p.yaml", names=["train"], files=[("p.yaml", NEWLINE_KEY)]))
@example(c=case("launch", "--print-config", "--config=--", names=["--config"]))
@example(c=case(*LOCAL, "--config=@ROOT@/case/p.yaml", names=["p.yaml"], files=[("p.yaml", b"a: !!int x")]))
@example(c=case(*PLAN, f"--config={LONG}", names=["preset"]))
def test_presets(sb, c):
    clean(sb, c)


@FUZZ
@given(c=TARGETS["run_names"])
@example(c=case(*CLOUD, "--name", FIXTURE_RUN, names=[repr(FIXTURE_RUN)]))
def test_run_names(sb, c):
    clean(sb, c)


@FUZZ
@given(c=TARGETS["gpu_specs"])
@example(c=case(*PLAN, "--nodes=0", names=["--nodes"]))
@example(c=case("launch", "--dry-run", "--config", "tiny", "--gpu=", names=["--gpu"]))
@example(c=case(*CLOUD, "--disk-size=0", names=["--disk-size"]))
@example(c=case(*PLAN, "--nodes=3", names=["--nodes"]))
def test_gpu_specs(sb, c):
    clean(sb, c)


@FUZZ
@given(c=TARGETS["store_uris"])
@example(c=case(*STAGE, "--store=", names=["--store", "store URI"]))
@example(c=case(*LOCAL, "--store=", names=["--store"]))
@example(c=case(*LOCAL, "--store=s3:/bucket/x", names=["--store"]))
@example(c=case(*LOCAL, "--store=file://", names=["--store"]))
@example(c=case(*STAGE, "--store=~no-such-user-x/s", names=["~no-such-user-x"]))
@example(c=case(*STAGE, "--store=s3://bucket/a\nb", names=["s3://bucket"]))
@example(c=case(*STAGE, f"--store=@ROOT@/{LONG}", names=["store root"]))
def test_store_uris(sb, c):
    clean(sb, c)


@FUZZ
@given(c=TARGETS["datasets"])
@example(c=case("stage", "--dataset=org/x\n", "--vocab-size=300", names=["org/x"]))
@example(c=case("stage", "--dataset=~no-such-user-x/d.jsonl", names=["~no-such-user-x"]))
@example(c=case(*LOCAL, "--dataset=", names=["data.dataset"]))
@example(c=case(*LOCAL, "--dataset= ", names=["data.dataset"]))
@example(c=case("stage", f"--dataset={LONG}.jsonl", names=["dataset path"]))
@example(c=case(*STAGE, f"--tokenizer={FIX}/{LONG}.json", names=["--tokenizer"]))
def test_datasets(sb, c):
    clean(sb, c)


@FUZZ
@given(c=TARGETS["numeric_flags"])
@example(c=case(*PLAN, "--tokens=1e400", names=["--tokens"]))
@example(c=case(*PLAN, "--tokens=infk", names=["--tokens"]))
@example(c=case(*STAGE, "--tokenizer-sample-mb=nan", names=["--tokenizer-sample-mb"]))
@example(c=case(*STAGE, "--tokenizer-sample-mb=-1", names=["--tokenizer-sample-mb"]))
@example(c=case(*PLAN, "--tokens-per-param=-0", names=["--tokens-per-param"]))
def test_numeric_flags(sb, c):
    clean(sb, c)


def test_accepted_inputs_pass_too(sb):
    """The property's other side: good input is accepted, takes effect (check_case reads the manifest, config
    and run.json it wrote), and what it wrote is cleared for the next case."""
    assert clean(sb, case(*STAGE, must_reject=None)) == "accepted"
    assert clean(sb, case(*LOCAL, "--override=train.lr=1e-3", must_reject=None)) == "accepted"
    # a hub revision for the local corpus: caught at launch now, not when the driver stages it
    assert clean(sb, case(*LOCAL, "--override=data.revision=2024", names=["--revision"])) == "rejected"
    assert clean(sb, case(*CLOUD, "--name=ok-run", must_reject=None)) == "accepted"
    assert sb.state() == sb.baseline


def test_config_yaml_that_is_not_yaml(tmp_path):
    """`lmctl train --run-config` reads a run's config.yaml with load_spec (not fuzzed: a good input would
    train): bytes that are not text, tabs, a tag PyYAML cannot build are one-line ConfigErrors."""
    bad = {"bytes.yaml": b"\xff\xfe", "tabs.yaml": b"model:\n\t- x", "tag.yaml": b"!!int x"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=f"cannot read config .*{name}") as e:
            load_spec(tmp_path / name)
        assert "\n" not in str(e.value)


def test_runner_reports_per_target(s3_server):
    """run_fuzz, as bench/chaos.py calls it: counts per target, violations listed rather than raised."""
    out = run_fuzz(3, seed=1, targets=["run_names", "gpu_specs"], s3_endpoint=s3_server)
    assert set(out) == {"run_names", "gpu_specs"}
    for r in out.values():
        assert r["tried"] + r["skipped"] >= 1 and r["rejected_clean"] + r["accepted"] == r["tried"]
        assert r["bad"] == []
