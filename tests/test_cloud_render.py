"""Cloud runs rendered, offline: every task.yaml SkyPilot's own schema accepts, the resources each launch
shape asks for, no secret in any file or output, and every bad request refused before anything is written.

Nothing here reaches SkyPilot's API server or the network: launches are dry runs, and with
SKYPILOT_DISABLE_LOCAL_API_SERVER=1 an accidental SDK call fails instead of starting a server.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from model.config import DEFAULT_CORPUS, load_spec, resolve
from orchestrator import runs
from orchestrator.cli import main
from orchestrator.gpus import parse_gpu
from orchestrator.launch import JOB_RECOVERY, Hardware, launch
from orchestrator.plan import load_prices

STORE = "s3://lmctl-test-bucket/prefix"
SECRETS = {
    "WANDB_API_KEY": "canary-wandb-4d1f0c",
    "AWS_ACCESS_KEY_ID": "AKIACANARY7Q2XK",
    "AWS_SECRET_ACCESS_KEY": "canary-secret-9b7e2a/+x",
    "AWS_SESSION_TOKEN": "canary-session-55e1d3",
    "HF_TOKEN": "hf_canary_8c3a61",
}
PRICES = load_prices()["prices"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No API server may start; no LMCTL_* or endpoint setting of the caller's leaks in."""
    monkeypatch.setenv("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
    for var in ("LMCTL_STORE", "LMCTL_RUNS_DIR", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LMCTL_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def canaries(monkeypatch) -> dict[str, str]:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    return SECRETS


# ---------------------------------------------------------------- what each launch shape renders


@dataclass
class Case:
    id: str
    hw: Hardware
    offers: list[tuple[str, str, int]]  # (cloud, SkyPilot accelerator name, GPUs per node), in order
    layout: str  # "single", "any_of" or "ordered": the resources block of task.yaml
    price: float | None  # USD per GPU-hour the plan uses (None: unknown)
    preset: str = "1b"
    overrides: list[str] = field(default_factory=list)


def _price(gpu: str, cloud: str, column: str = "on_demand") -> float:
    return PRICES[gpu][cloud][column]


CASES = [
    Case(
        "single-gpu",
        Hardware("RTX5090"),
        [("runpod", "RTX5090", 1), ("kubernetes", "RTX5090", 1)],
        "any_of",
        _price("RTX5090", "runpod"),
    ),
    Case(
        "eight-gpus",
        Hardware("A100-80GB:8"),
        [
            ("runpod", "A100-80GB-SXM", 8),
            ("lambda", "A100-80GB", 8),
            ("aws", "A100-80GB", 8),
            ("gcp", "A100-80GB", 8),
            ("kubernetes", "A100-80GB", 8),
        ],
        "any_of",
        min(_price("A100-80GB", c) for c in ("runpod", "lambda", "aws", "gcp")),
    ),
    Case(
        "two-nodes",
        Hardware("H100:8", nodes=2, cloud="aws"),
        [("aws", "H100", 8)],
        "single",
        _price("H100-SXM", "aws"),
    ),
    Case(
        "spot-gcp",
        Hardware("H100", cloud="gcp", spot=True),
        [("gcp", "H100", 1)],
        "single",
        _price("H100-SXM", "gcp", "spot"),
    ),
    Case(
        "spot-any-cloud",  # Lambda has no spot, Kubernetes none without spot node labels
        Hardware("H100", spot=True),
        [("runpod", "H100-SXM", 1), ("aws", "H100", 1), ("gcp", "H100", 1)],
        "any_of",
        min(_price("H100-SXM", c, "spot") for c in ("runpod", "aws", "gcp")),
    ),
    Case(
        "fallbacks",
        Hardware("RTX5090,RTX4090"),
        [
            ("runpod", "RTX5090", 1),
            ("kubernetes", "RTX5090", 1),
            ("runpod", "RTX4090", 1),
            ("kubernetes", "RTX4090", 1),
        ],
        "ordered",
        _price("RTX5090", "runpod"),  # the plan prices the first choice
        preset="350m",
    ),
    Case(
        "rtx-two-nodes",  # RunPod has no multi-node: only Kubernetes is left, and it has no price
        Hardware("RTX5090", nodes=2),
        [("kubernetes", "RTX5090", 1)],
        "single",
        None,
    ),
    Case("runpod", Hardware("RTX5090", cloud="runpod"), [("runpod", "RTX5090", 1)], "single", 0.89),
    Case("lambda", Hardware("H100:8", cloud="lambda"), [("lambda", "H100", 8)], "single", 2.99),
    Case("aws", Hardware("L40S:4", cloud="aws"), [("aws", "L40S", 4)], "single", 1.86),
    Case("gcp", Hardware("A100:8", cloud="gcp"), [("gcp", "A100", 8)], "single", 3.67),
    Case(
        "kubernetes",  # your own cluster: no price in the table
        Hardware("RTX4090", cloud="kubernetes"),
        [("kubernetes", "RTX4090", 1)],
        "single",
        None,
        preset="124m",
    ),
    Case(
        "kubernetes-priced",
        Hardware("A100-80GB:2", cloud="kubernetes", price=1.25),
        [("kubernetes", "A100-80GB", 2)],
        "single",
        1.25,
    ),
    Case(
        "no-managed",
        Hardware("H100:8", cloud="lambda", managed=False),
        [("lambda", "H100", 8)],
        "single",
        2.99,
    ),
    Case(
        "image-and-disk",
        Hardware("H100:2", cloud="aws", image="docker:nvcr.io/nvidia/pytorch:25.01-py3", disk_size=300),
        [("aws", "H100", 2)],
        "single",
        6.88,
    ),
    Case(
        "image-any-cloud",  # a docker image runs everywhere, Lambda included
        Hardware("H100", image="docker:nvcr.io/nvidia/pytorch:25.01-py3", disk_size=40),
        [("runpod", "H100-SXM", 1), ("lambda", "H100", 1), ("aws", "H100", 1)]
        + [("gcp", "H100", 1), ("kubernetes", "H100", 1)],
        "any_of",
        2.69,
    ),
]


def test_the_hardcoded_prices_are_the_tables():
    """The literal prices in CASES are the shipped table's (a table update shows up here, not as a riddle)."""
    assert (_price("RTX5090", "runpod"), _price("H100-SXM", "lambda")) == (0.89, 2.99)
    assert (_price("L40S", "aws"), _price("A100", "gcp"), _price("H100-SXM", "aws")) == (1.86, 3.67, 6.88)
    assert min(_price("H100-SXM", c) for c in ("runpod", "lambda", "aws", "gcp")) == 2.69


def _dry_run(case: Case, root: Path, name: str | None = None):
    return launch(
        case.preset,
        case.overrides,
        name=name or case.id,
        hardware=case.hw,
        dry_run=True,
        store=STORE,
        root=root,
    )


def _offers(task) -> list[tuple[str, str, int]]:
    out = []
    for r in task.resources:
        ((acc, n),) = r.accelerators.items()
        out.append((str(r.cloud).lower(), acc, n))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rendered_task_loads_in_skypilot_with_the_asked_resources(case, tmp_path):
    import sky

    hw = case.hw
    launched = _dry_run(case, tmp_path)
    path = launched.path
    assert path == tmp_path / case.id and launched.record.state == "created"

    raw = yaml.safe_load((path / runs.TASK).read_text())
    block = raw["resources"]
    if case.layout == "single":
        assert "any_of" not in block and "ordered" not in block and block["cloud"] == case.offers[0][0]
    else:
        assert "cloud" not in block and len(block[case.layout]) == len(case.offers)

    task = sky.Task.from_yaml(str(path / runs.TASK))  # SkyPilot's own schema; no validate(): no catalogs
    assert task.name == case.id and task.num_nodes == hw.nodes
    if case.layout == "ordered":
        assert isinstance(task.resources, list) and _offers(task) == case.offers
    else:
        assert sorted(_offers(task)) == sorted(case.offers)
    for r in task.resources:
        assert r.disk_size == hw.disk_size
        assert bool(r.use_spot) is hw.spot
        assert r.job_recovery == (JOB_RECOVERY if hw.managed else None)
        if hw.image:
            assert r.extract_docker_image() == hw.image.removeprefix("docker:")
        else:
            assert r.image_id is None
    assert task.envs["LMCTL_RUN"] == case.id and task.envs["LMCTL_STORE"] == STORE
    assert "orchestrator.driver --pod" in task.run and "bootstrap.sh" in task.setup
    assert task.secrets == {}

    per_node = case.offers[0][2]
    record = runs.read_record(path)
    assert record.mode == "cloud" and record.workers == hw.nodes * per_node
    assert record.gpu.endswith(f":{per_node}") and parse_gpu(record.gpu) == parse_gpu(hw.gpu)
    assert (record.nodes, record.cloud, record.spot, record.managed) == (
        hw.nodes,
        hw.cloud,
        hw.spot,
        hw.managed,
    )
    assert (record.job_id, record.cluster, record.launches) == (None, None, 0)
    assert record.checkpoints == f"{STORE}/runs/{case.id}/checkpoints"
    if case.price is None:
        assert record.price_per_hour is None
    else:
        assert record.price_per_hour == pytest.approx(case.price * record.workers)

    # config.yaml: its global batch splits over the workers with the plan's micro-batch
    spec = load_spec(path / runs.CONFIG)
    seqs = spec.train.global_batch_tokens // spec.model.seq_len
    accum = spec.grad_accum_steps(record.workers)
    assert spec.train.micro_batch_size * accum * record.workers == seqs


def test_gpu_text_in_the_record_is_canonical(tmp_path):
    """run.json's gpu reads back (gpus.parse_gpu) to the same request: canonical names and the count."""
    expected = {
        "single-gpu": "RTX5090:1",
        "eight-gpus": "A100-80GB:8",
        "two-nodes": "H100-SXM:8",
        "fallbacks": "RTX5090,RTX4090:1",
        "lambda": "H100-SXM:8",
    }
    for case in (c for c in CASES if c.id in expected):
        record = _dry_run(case, tmp_path).record
        assert record.gpu == expected[case.id]
        assert parse_gpu(record.gpu) == parse_gpu(case.hw.gpu)


def test_a_run_that_does_not_fit_the_config_micro_batch_gets_the_plans(tmp_path):
    """1b with micro-batch 64 does not fit an RTX5090: the plan picks a smaller one and config.yaml says so,
    keeping the global batch."""
    case = Case("shrunk", Hardware("RTX5090"), [], "any_of", None, overrides=["train.micro_batch_size=64"])
    path = _dry_run(case, tmp_path).path
    spec = load_spec(path / runs.CONFIG)
    assert 1 <= spec.train.micro_batch_size < 64
    assert spec.train.global_batch_tokens == resolve("1b").train.global_batch_tokens


def test_endpoint_settings_are_rendered_but_credentials_never(tmp_path, monkeypatch, canaries):
    """Where the bucket is (AWS_ENDPOINT_URL, AWS_REGION) reaches the pods through task.yaml; who may read
    it does not."""
    import sky

    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://r2.example.com")
    monkeypatch.setenv("AWS_REGION", "auto")
    path = _dry_run(CASES[0], tmp_path).path
    task = sky.Task.from_yaml(str(path / runs.TASK))
    assert task.envs["AWS_ENDPOINT_URL"] == "https://r2.example.com" and task.envs["AWS_REGION"] == "auto"
    assert not set(SECRETS) & set(task.envs)


# ---------------------------------------------------------------- secrets


def _files_text(path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(path.rglob("*")) if p.is_file())


def _assert_clean(text: str) -> None:
    leaked = [k for k, v in SECRETS.items() if v in text]
    assert not leaked, f"secret values of {leaked} were written"


def test_no_secret_in_any_rendered_file(tmp_path, canaries):
    for case in CASES:
        path = _dry_run(case, tmp_path).path
        text = _files_text(path)
        assert {runs.TASK, runs.CONFIG, runs.RUN_RECORD} <= {p.name for p in path.iterdir()}
        assert "LMCTL_RUN" in text and case.id in text  # the files were read
        _assert_clean(text)


def test_no_secret_in_cli_outputs(tmp_path, capsys, canaries):
    root = tmp_path / "runs"
    base = ["launch", "--config", "1b", "--gpu", "H100:8", "--nodes", "2", "--cloud", "aws", "--spot"]
    base += ["--store", STORE, "--runs-dir", str(root), "--wandb"]

    assert main([*base, "--print-config"]) == 0
    out = capsys.readouterr()
    assert yaml.safe_load(out.out)["wandb"]["enabled"] is True
    _assert_clean(out.out + out.err)

    assert main([*base, "--name", "leak", "--dry-run", "--json"]) == 0
    out = capsys.readouterr()
    shown = json.loads(out.out)
    assert (shown["name"], shown["state"], shown["workers"], shown["spot"]) == ("leak", "created", 16, True)
    _assert_clean(out.out + out.err)
    _assert_clean(_files_text(root))

    assert main([*base, "--name", "leak2", "--dry-run"]) == 0  # the plan table on stderr
    out = capsys.readouterr()
    assert "H100" in out.err and "nothing launched" in out.out
    _assert_clean(out.out + out.err)

    assert main(["status", "leak", "--json", "--runs-dir", str(root)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["gpu"] == "H100-SXM:8"
    _assert_clean(out.out + out.err)


def test_secrets_are_attached_in_memory_only(tmp_path, canaries):
    from orchestrator import cloud

    path = _dry_run(CASES[2], tmp_path).path
    before = (path / runs.TASK).read_bytes()
    secrets = cloud.secrets_from_env(STORE)
    assert secrets == SECRETS
    task = cloud.load_task(path / runs.TASK, secrets)
    assert {k: v.get_secret_value() for k, v in task.secrets.items()} == SECRETS
    _assert_clean(repr(task.secrets))  # SecretStr: a log line or traceback shows stars
    assert not set(SECRETS) & set(task.envs)  # secrets, not plain envs (SkyPilot redacts secrets)
    assert (path / runs.TASK).read_bytes() == before
    _assert_clean(_files_text(path))


def test_secrets_from_env_takes_only_what_is_set(monkeypatch, tmp_path):
    from orchestrator import cloud

    empty = tmp_path / "no-aws"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for k in (
        *SECRETS,
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    monkeypatch.setenv("WANDB_API_KEY", "")  # empty: not a secret to send
    assert cloud.secrets_from_env("file:///x") == {"HF_TOKEN": SECRETS["HF_TOKEN"]}
    assert cloud.secrets_from_env(STORE) == {"HF_TOKEN": SECRETS["HF_TOKEN"]}  # no credentials anywhere


def test_load_task_refuses_a_task_skypilot_rejects(tmp_path):
    from orchestrator import cloud

    bad = tmp_path / "task.yaml"
    bad.write_text("name: x\nresources:\n  accelerators: {H100: 1}\n  no_such_field: 1\nrun: echo\n")
    with pytest.raises(cloud.CloudError, match="SkyPilot rejects the task") as e:
        cloud.load_task(bad)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- refusals: nothing written


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--gpu", "RTX9090"], "unknown GPU 'RTX9090'"),
        (["--gpu", "H100:3"], "3 GPUs per node is not allowed"),
        (["--gpu", "RTX5090", "--nodes", "2", "--cloud", "runpod"], "RunPod cannot run multi-node"),
        (["--gpu", "RTX5090", "--nodes", "2", "--spot"], "no cloud offering RTX5090 can run 2 nodes on spot"),
        (["--gpu", "H100", "--cloud", "lambda", "--spot"], "Lambda has no spot"),
        (["--gpu", "H100", "--cloud", "kubernetes", "--spot"], "does not run spot on Kubernetes"),
        (["--gpu", "RTX5090", "--cloud", "gcp"], "RTX5090 is not offered on gcp"),
        (["--gpu", "RTX5090", "--cloud", "vast"], "unknown cloud 'vast'"),
        (["--gpu", "RTX5090", "--store", "file:///tmp/lmctl-store"], "a cloud run needs a bucket"),
        (["--gpu", "RTX5090", "--disk-size", "5"], "--disk-size 5"),
        (["--gpu", "RTX5090", "--nodes", "65"], "--nodes 65 is out of range"),
        (["--nodes", "2"], "--nodes is for cloud runs"),
        (["--spot"], "--spot is for cloud runs"),
        (["--gpu", "RTX5090", "--mode", "local"], "--gpu is for cloud runs"),
        (["--mode", "cloud"], "a cloud run needs --gpu"),
        (
            ["--gpu", "RTX4090", "--override", "train.activation_checkpointing=false"],
            "the run does not fit: does not fit: ddp on RTX4090",
        ),
        (["--gpu", "H100:8", "--nodes", "3", "--cloud", "aws"], "does not split over 24 GPUs"),
        (["--gpu", "RTX5090", "--price", "-1"], "--price -1"),
        (["--gpu", "RTX5090", "--mfu", "2"], "--mfu 2"),
    ],
)
def test_bad_cloud_launches_are_refused_before_anything_is_written(tmp_path, capsys, args, fragment):
    root = tmp_path / "runs"
    argv = ["launch", "--config", "1b", "--name", "refused", "--runs-dir", str(root), "--dry-run"]
    if "--store" not in args:
        argv += ["--store", STORE]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err
    assert not (root / "refused").exists() and (not root.exists() or list(root.iterdir()) == [])


def test_unknown_gpu_lists_the_known_ones(capsys, tmp_path):
    from orchestrator.gpus import CATALOG

    assert main(["launch", "--gpu", "H10", "--store", STORE, "--runs-dir", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "did you mean H100" in err or "did you mean H100-SXM" in err
    assert all(name in err for name in CATALOG)


def test_dry_run_needs_no_credentials_and_no_network(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "no-aws"
    for k in (*SECRETS, "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    attempts = []

    def no_network(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    root = tmp_path / "runs"
    argv = ["launch", "--gpu", "RTX5090", "--config", "1b", "--store", "s3://bucket/p", "--dry-run"]
    assert main([*argv, "--name", "offline", "--runs-dir", str(root)]) == 0
    out = capsys.readouterr()
    assert "nothing launched" in out.out and "RTX5090" in out.err  # the plan, then the files
    assert attempts == []
    record = runs.read_record(root / "offline")
    assert (record.state, record.store, record.gpu) == ("created", "s3://bucket/p", "RTX5090:1")


# ---------------------------------------------------------------- lmctl plan


def test_plan_json_has_the_numbers(capsys):
    assert (
        main(["plan", "--gpu", "H100:8", "--nodes", "2", "--cloud", "aws", "--config", "1b", "--json"]) == 0
    )
    plan = json.loads(capsys.readouterr().out)
    for key in ("params", "memory", "micro_batch", "grad_accum", "tokens_per_s", "hours", "cost"):
        assert key in plan, key
    assert plan["fits"] is True and plan["world"] == 16
    assert plan["micro_batch"] * plan["grad_accum"] * plan["world"] == plan["global_batch_seqs"]
    assert plan["cost"] == pytest.approx(plan["hours"] * 16 * _price("H100-SXM", "aws"))
    assert set(plan["memory"]) == {f"{p}{c}" for p in ("ddp", "fsdp") for c in ("", "+selective", "+full")}
    assert plan["params"] > 1e9


def test_plan_exits_1_when_it_does_not_fit(capsys):
    argv = [
        "plan",
        "--gpu",
        "RTX4090",
        "--config",
        "1b",
        "--override",
        "train.activation_checkpointing=false",
    ]
    assert main(argv) == 1
    assert "does not fit" in capsys.readouterr().out
    assert main([*argv, "--json"]) == 1  # the same exit code; the JSON says it too: "fits": false
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False and plan["micro_batch"] is None and plan["grad_accum"] is None


def test_plan_refuses_bad_input_in_one_line(capsys):
    assert main(["plan", "--gpu", "RTX5090", "--cloud", "lambda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not offered on lambda" in err and err.count("\n") == 1


def test_a_hub_dataset_is_staged_up_to_what_the_run_trains_on(tmp_path, monkeypatch):
    """fineweb-edu is over a trillion tokens: a cloud launch stages what 1b's steps consume, not all of it."""
    monkeypatch.setenv("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
    from model.config import load_spec

    def staged_tokens(name: str, *overrides: str, mixture=None) -> int | None:
        launch(
            "1b",
            list(overrides),
            name=name,
            store="s3://bucket/p",
            root=tmp_path,
            dry_run=True,
            hardware=Hardware("RTX5090"),
            mixture=mixture,
        )
        return load_spec(tmp_path / name / "config.yaml").data.max_tokens

    # 25000 steps x 1,048,576 tokens = 26.2B to train on, over 95% of what is staged (5% is held out)
    assert staged_tokens("hub", "data.dataset=HuggingFaceFW/fineweb-edu") == 27_594_105_264
    assert (
        staged_tokens("capped", "data.dataset=HuggingFaceFW/fineweb-edu", "data.max_tokens=1000000") == 10**6
    )
    assert staged_tokens("local") is None  # a local file is staged whole (the shipped corpus)
    corpus = str(DEFAULT_CORPUS)
    hub_and_local = [{"dataset": "HuggingFaceFW/fineweb-edu", "weight": 0.7}, {"dataset": corpus}]
    assert staged_tokens("mix", mixture=hub_and_local) == 27_594_105_264  # no source gives more than the run
    local_only = [{"dataset": corpus}, {"dataset": corpus, "weight": 2}]
    assert staged_tokens("mix-local", mixture=local_only) is None
