"""The GPU catalog, --gpu parsing, per-cloud refusals and SkyPilot resources, checked offline against the
installed SkyPilot (its name maps, its unsupported-feature tables and its task YAML loader)."""

import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model.errors import ConfigError
from model.hardware import gpu_for_device, peak_flops
from orchestrator.gpus import (
    CATALOG,
    CLOUDS,
    UNSUPPORTED,
    Gpu,
    GpuRequest,
    check_combination,
    find_gpu,
    parse_gpu,
    refusal,
    sky_resources,
    viable_clouds,
)


@pytest.fixture(autouse=True)
def _no_api_server(monkeypatch):
    """Nothing here talks to SkyPilot's API server; make sure nothing could start one."""
    monkeypatch.setenv("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")


# ---------------------------------------------------------------- the catalog

# name: (memory GB, dense bf16 TFLOPS, what torch.cuda.get_device_name() says on one)
EXPECTED = {
    "RTX5090": (32, 209.5, "NVIDIA GeForce RTX 5090"),
    "RTX4090": (24, 165.2, "NVIDIA GeForce RTX 4090"),
    "RTXA6000": (48, 154.8, "NVIDIA RTX A6000"),
    "L40S": (48, 362.0, "NVIDIA L40S"),
    "A100": (40, 312.0, "NVIDIA A100-SXM4-40GB"),
    "A100-PCIE": (40, 312.0, "NVIDIA A100-PCIE-40GB"),
    "A100-80GB": (80, 312.0, "NVIDIA A100-SXM4-80GB"),
    "A100-80GB-PCIE": (80, 312.0, "NVIDIA A100 80GB PCIe"),
    "H100-SXM": (80, 989.0, "NVIDIA H100 80GB HBM3"),
    "H100-PCIE": (80, 756.0, "NVIDIA H100 PCIe"),
    "H100-NVL": (94, 835.0, "NVIDIA H100 NVL"),
    "H200": (141, 989.0, "NVIDIA H200"),
    "B200": (180, 2250.0, "NVIDIA B200"),
}


def test_catalog_has_the_gpus_with_their_figures():
    assert set(CATALOG) == set(EXPECTED)
    for name, (mem, tflops, _) in EXPECTED.items():
        gpu = CATALOG[name]
        assert (gpu.name, gpu.memory_gb, gpu.peak_tflops) == (name, mem, tflops)
        assert gpu.clouds and set(gpu.clouds) <= set(CLOUDS)


@pytest.mark.parametrize("name", EXPECTED)
def test_peaks_agree_with_the_runtime_mfu_table(name):
    """model/hardware.py computes MFU on the pod from the device name; plan uses the catalog."""
    assert peak_flops(EXPECTED[name][2]) == CATALOG[name].peak_tflops * 1e12


def test_every_rentable_gpu_is_known_by_its_device_names():
    """One table: the peak MFU divides by on the pod (from torch's device name) is the peak a plan uses."""
    for gpu in (g for g in CATALOG.values() if g.clouds):
        assert gpu.devices, gpu.name
        for device in gpu.devices:
            assert gpu_for_device(f"NVIDIA {device}") is gpu, (gpu.name, device)
            assert peak_flops(f"NVIDIA {device}") == gpu.peak_tflops * 1e12, (gpu.name, device)


def test_hardware_imports_neither_torch_nor_orchestrator():
    roots = "{m.split('.')[0] for m in sys.modules}"
    code = f"import sys, model.hardware; print(sorted({roots} & {{'torch', 'orchestrator'}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_runpod_names_are_skypilots():
    from sky.provision.runpod.utils import GPU_NAME_MAP

    for gpu in CATALOG.values():
        if "runpod" in gpu.clouds:
            assert gpu.clouds["runpod"] in GPU_NAME_MAP, gpu.name
    # RunPod's own names: its bare "H100" and "A100-80GB" are the PCIe cards
    assert "PCIe" in GPU_NAME_MAP[CATALOG["H100-PCIE"].clouds["runpod"]]
    assert "SXM" in GPU_NAME_MAP[CATALOG["A100-80GB"].clouds["runpod"]]
    assert "PCIe" in GPU_NAME_MAP[CATALOG["A100-80GB-PCIE"].clouds["runpod"]]
    assert GPU_NAME_MAP[CATALOG["H100-SXM"].clouds["runpod"]] == "NVIDIA H100 80GB HBM3"


def test_lambda_names_and_memory_are_skypilots():
    from sky.catalog.data_fetchers.fetch_lambda_cloud import GPU_TO_MEMORY

    for gpu in CATALOG.values():
        if "lambda" in gpu.clouds:
            assert GPU_TO_MEMORY[gpu.clouds["lambda"]] == gpu.memory_gb * 1024, gpu.name


def _fetcher_source(cloud: str) -> str:
    # fetch_gcp asks for Google credentials on import, so read the fetchers' text instead
    spec = find_spec("sky.catalog.data_fetchers")
    return (Path(spec.origin).parent / f"fetch_{cloud}.py").read_text()


def test_gcp_names_are_in_skypilots_gcp_fetcher():
    text = _fetcher_source("gcp")
    for gpu in CATALOG.values():
        if "gcp" in gpu.clouds:
            assert f"'{gpu.clouds['gcp']}'" in text, gpu.name


def test_aws_fixups_are_skypilots():
    """AWS names are EC2's own GPU names; SkyPilot renames p4de to A100-80GB and p5e/p5en to H200."""
    text = _fetcher_source("aws")
    assert "acc_name = 'A100-80GB'" in text and "acc_name = 'H200'" in text
    assert CATALOG["A100-80GB"].clouds["aws"] == "A100-80GB" and CATALOG["H200"].clouds["aws"] == "H200"


# (GPU, a GPU-feature-discovery node label value of that card)
GFD_LABELS = [
    ("RTX5090", "NVIDIA-GeForce-RTX-5090"),
    ("RTX4090", "NVIDIA-GeForce-RTX-4090"),
    ("RTXA6000", "NVIDIA-RTX-A6000"),
    ("L40S", "NVIDIA-L40S"),
    ("A100", "NVIDIA-A100-SXM4-40GB"),
    ("A100-PCIE", "NVIDIA-A100-PCIE-40GB"),
    ("A100-80GB", "NVIDIA-A100-SXM4-80GB"),
    ("A100-80GB-PCIE", "NVIDIA-A100-80GB-PCIe"),
    ("H100-SXM", "NVIDIA-H100-80GB-HBM3"),
    ("H100-PCIE", "NVIDIA-H100-PCIe"),
    ("H100-NVL", "NVIDIA-H100-NVL"),
    ("H200", "NVIDIA-H200"),
    ("B200", "NVIDIA-B200"),
]


@pytest.mark.parametrize("name, label", GFD_LABELS)
def test_kubernetes_names_match_how_skypilot_reads_node_labels(name, label):
    from sky.provision.kubernetes import utils as kube

    seen = kube.GFDLabelFormatter.get_accelerator_from_label_value(label)
    assert kube._accelerator_name_matches(CATALOG[name].clouds["kubernetes"], [seen])


def test_gpus_import_nothing_heavy():
    heavy = "('torch', 'sky', 'yaml', 'pydantic')"
    code = f"import sys, orchestrator.gpus; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- --gpu


@pytest.mark.parametrize(
    "text, names, count",
    [
        ("RTX5090", ["RTX5090"], 1),
        ("A100-80GB:8", ["A100-80GB"], 8),
        ("RTX5090,RTX4090", ["RTX5090", "RTX4090"], 1),
        ("rtx5090,rtx4090:2", ["RTX5090", "RTX4090"], 2),
        (" h100 : 4 ", ["H100-SXM"], 4),
        ("H100", ["H100-SXM"], 1),
        ("h100-sxm:8", ["H100-SXM"], 8),
        ("H100 PCIe", ["H100-PCIE"], 1),
        ("A6000", ["RTXA6000"], 1),
        ("RTX A6000:2", ["RTXA6000"], 2),
        ("rtx-5090", ["RTX5090"], 1),
        ("A100-80GB-SXM", ["A100-80GB"], 1),
        ("A100-40GB", ["A100"], 1),
        ("H200-SXM:8", ["H200"], 8),
        ("b200:8", ["B200"], 8),
    ],
)
def test_parse_gpu(text, names, count):
    req = parse_gpu(text)
    assert [g.name for g in req.gpus] == names and req.count == count
    assert req.primary.name == names[0]
    assert req.text() == f"{','.join(names)}:{count}"
    assert parse_gpu(req.text()) == req


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "--gpu is empty"),
        ("   ", "--gpu is empty"),
        ("H100:0", "0 GPUs per node is not allowed; use one of 1, 2, 4, 8"),
        ("H100:3", "3 GPUs per node is not allowed"),
        ("H100:16", "(--nodes for more)"),
        ("H100:-1", "must be one of 1, 2, 4, 8"),
        ("H100:x", "must be one of 1, 2, 4, 8"),
        ("H100::2", "must be one of 1, 2, 4, 8"),
        ("H100:", "must be one of 1, 2, 4, 8"),
        ("H100:2.0", "must be one of 1, 2, 4, 8"),
        ("H100:\u0668", "must be one of 1, 2, 4, 8"),  # ARABIC-INDIC EIGHT: int() reads it as 8
        ("H100,,A100", "empty GPU name"),
        ("H100,", "empty GPU name"),
        (",H100", "empty GPU name"),
        ("RTX5090,rtx-5090", "RTX5090 is listed twice"),
        ("H100,H100-SXM", "H100-SXM is listed twice"),
        ("V100", "unknown GPU 'V100'"),
        ("H1000", "did you mean"),
        ("RTX5090,TPU", "unknown GPU 'TPU'"),
    ],
)
def test_parse_gpu_rejects_with_one_line(text, fragment):
    with pytest.raises(ConfigError) as e:
        parse_gpu(text)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        find_gpu("K80")
    assert all(name in str(e.value) for name in CATALOG)


@given(
    st.lists(st.sampled_from(sorted(CATALOG)), min_size=1, max_size=4, unique=True),
    st.sampled_from([1, 2, 4, 8]),
    st.booleans(),
)
def test_text_round_trips(names, count, lower):
    req = GpuRequest(tuple(CATALOG[n] for n in names), count)
    text = req.text().lower() if lower else req.text()
    assert parse_gpu(text) == req


# ---------------------------------------------------------------- refusals


def test_refusal_table_agrees_with_skypilot():
    """Our per-cloud table of the features lmctl touches is SkyPilot's own, read offline."""
    import sky
    from sky.clouds import CloudImplementationFeatures as F
    from sky.utils import registry

    features = [F.MULTI_NODE, F.SPOT_INSTANCE, F.STORAGE_MOUNTING, F.IMAGE_ID]
    for cloud in CLOUDS:
        obj = registry.CLOUD_REGISTRY.from_str(cloud)
        if cloud in ("aws", "gcp"):  # computed per request; no network involved for these
            res = sky.Resources(cloud=obj, accelerators={"H100": 8}, use_spot=True)
            theirs = set(obj._unsupported_features_for_resources(res))
        else:  # static tables (Kubernetes lifts spot only for clusters with spot labels)
            theirs = set(type(obj)._CLOUD_UNSUPPORTED_FEATURES)
        for f in features:
            assert (refusal(cloud, f.value) is not None) == (f in theirs), (cloud, f)
    assert set(UNSUPPORTED) == set(CLOUDS)


@pytest.mark.parametrize(
    "gpu, cloud, nodes, spot, fragment",
    [
        ("H100", "azure", 1, False, "unknown cloud 'azure'; use one of runpod, lambda, aws, gcp, kubernetes"),
        ("RTX5090", "aws", 1, False, "RTX5090 is not offered on aws; it is on runpod, kubernetes"),
        ("L40S", "gcp", 1, False, "L40S is not offered on gcp"),
        ("A100", "runpod", 1, False, "A100 is not offered on runpod"),
        ("RTX5090,H100", "runpod", 1, False, None),
        ("RTX5090,H100", "lambda", 1, False, "RTX5090 is not offered on lambda"),
        ("H100:8", "runpod", 2, False, "RunPod cannot run multi-node"),
        ("H100:8", "lambda", 1, True, "Lambda has no spot"),
        ("H100:8", "kubernetes", 1, True, "spot on Kubernetes"),
        ("H100:8", "aws", 0, False, "--nodes 0 is out of range; use 1 to 64"),
        ("H100:8", "aws", 65, False, "use 1 to 64"),
        ("H100:8", None, -1, False, "use 1 to 64"),
        ("RTX5090", None, 2, True, "no cloud offering RTX5090 can run 2 nodes on spot"),
        ("RTX5090", None, 2, False, None),  # kubernetes can
        ("RTXA6000", None, 1, True, None),  # runpod can
        ("H100-NVL", None, 2, True, "runpod: RunPod cannot run multi-node"),
        ("H100:8", "aws", 64, True, None),
        ("H100:8", "RunPod", 1, True, None),
    ],
)
def test_check_combination(gpu, cloud, nodes, spot, fragment):
    req = parse_gpu(gpu)
    if fragment is None:
        check_combination(req, cloud, nodes, spot)
        return
    with pytest.raises(ConfigError) as e:
        check_combination(req, cloud, nodes, spot)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_viable_clouds():
    h100 = CATALOG["H100-SXM"]
    assert viable_clouds(h100, None, 1, False) == ["runpod", "lambda", "aws", "gcp", "kubernetes"]
    assert viable_clouds(h100, None, 1, True) == ["runpod", "aws", "gcp"]
    assert viable_clouds(h100, None, 4, True) == ["aws", "gcp"]
    assert viable_clouds(h100, None, 4, False) == ["lambda", "aws", "gcp", "kubernetes"]
    assert viable_clouds(h100, None, 1, False, image="ami-123") == ["runpod", "aws", "gcp", "kubernetes"]
    assert viable_clouds(h100, "lambda", 1, False, image="docker:x") == ["lambda"]


# ---------------------------------------------------------------- SkyPilot resources


def _load(resources: dict, num_nodes: int = 1):
    """Through SkyPilot's own task schema and Resources (offline: no validate(), no catalog)."""
    import sky

    return sky.Task.from_yaml_config(
        {"name": "t", "num_nodes": num_nodes, "resources": resources, "run": "echo"}
    )


def _offers(task) -> list[tuple[str, str, int, bool]]:
    out = []
    for r in task.resources:
        ((acc, n),) = r.accelerators.items()
        out.append((str(r.cloud).lower(), acc, n, bool(r.use_spot)))
    return sorted(out)


SINGLE = [
    (gpu.name, cloud, count, spot)
    for gpu in CATALOG.values()
    for cloud in gpu.clouds
    for count in (1, 8)
    for spot in (False, True)
    if not (spot and refusal(cloud, "spot_instance"))
]


@pytest.mark.parametrize("name, cloud, count, spot", SINGLE)
def test_every_gpu_on_every_cloud_loads_in_skypilot(name, cloud, count, spot):
    gpu = CATALOG[name]
    res = sky_resources(GpuRequest((gpu,), count), cloud, spot, 120)
    expected = {"disk_size": 120, "cloud": cloud, "accelerators": f"{gpu.clouds[cloud]}:{count}"}
    assert res == ({**expected, "use_spot": True} if spot else expected)
    task = _load(res)
    assert _offers(task) == [(cloud, gpu.clouds[cloud], count, spot)]
    assert {r.disk_size for r in task.resources} == {120}


@pytest.mark.parametrize("name", sorted(CATALOG))
@pytest.mark.parametrize("spot", [False, True])
def test_one_gpu_on_any_cloud_is_any_of_its_clouds(name, spot):
    gpu = CATALOG[name]
    clouds = [c for c in gpu.clouds if not (spot and refusal(c, "spot_instance"))]
    if not clouds:
        with pytest.raises(ConfigError):
            sky_resources(GpuRequest((gpu,), 8), None, spot, 100)
        return
    res = sky_resources(GpuRequest((gpu,), 8), None, spot, 100)
    want = [{"cloud": c, "accelerators": f"{gpu.clouds[c]}:8"} for c in clouds]
    if len(want) == 1:
        assert res["cloud"] == want[0]["cloud"] and res["accelerators"] == want[0]["accelerators"]
    else:
        assert res["any_of"] == want and "cloud" not in res and "accelerators" not in res
    assert res.get("use_spot", False) == spot
    assert _offers(_load(res)) == sorted((c, gpu.clouds[c], 8, spot) for c in clouds)


def test_h100_any_cloud():
    res = sky_resources(parse_gpu("H100:8"), None, False, 200)
    assert res == {
        "disk_size": 200,
        "any_of": [
            {"cloud": "runpod", "accelerators": "H100-SXM:8"},
            {"cloud": "lambda", "accelerators": "H100:8"},
            {"cloud": "aws", "accelerators": "H100:8"},
            {"cloud": "gcp", "accelerators": "H100:8"},
            {"cloud": "kubernetes", "accelerators": "H100:8"},
        ],
    }


def test_fallbacks_are_ordered_gpu_major():
    res = sky_resources(parse_gpu("RTX5090,RTX4090"), None, False, 100)
    assert res["ordered"] == [
        {"cloud": "runpod", "accelerators": "RTX5090:1"},
        {"cloud": "kubernetes", "accelerators": "RTX5090:1"},
        {"cloud": "runpod", "accelerators": "RTX4090:1"},
        {"cloud": "kubernetes", "accelerators": "RTX4090:1"},
    ]
    task = _load(res)
    assert [(str(r.cloud).lower(), *r.accelerators.items()) for r in task.resources] == [
        ("runpod", ("RTX5090", 1)),
        ("kubernetes", ("RTX5090", 1)),
        ("runpod", ("RTX4090", 1)),
        ("kubernetes", ("RTX4090", 1)),
    ]


def test_fallbacks_on_one_cloud_and_spot():
    res = sky_resources(parse_gpu("H200,H100-SXM,A100-80GB:8"), "runpod", True, 100)
    assert res == {
        "disk_size": 100,
        "use_spot": True,
        "ordered": [
            {"cloud": "runpod", "accelerators": "H200-SXM:8"},
            {"cloud": "runpod", "accelerators": "H100-SXM:8"},
            {"cloud": "runpod", "accelerators": "A100-80GB-SXM:8"},
        ],
    }
    assert len(_load(res).resources) == 3


def test_spot_any_cloud_skips_clouds_without_spot():
    res = sky_resources(parse_gpu("RTXA6000,H100-SXM:8"), None, True, 100)
    clouds = [e["cloud"] for e in res["ordered"]]
    assert "lambda" not in clouds and "kubernetes" not in clouds
    assert res["ordered"][0] == {"cloud": "runpod", "accelerators": "RTXA6000:8"}
    _load(res)


def test_multi_node_any_cloud_skips_runpod():
    res = sky_resources(parse_gpu("H100:8"), None, False, 100, nodes=4)
    assert [e["cloud"] for e in res["any_of"]] == ["lambda", "aws", "gcp", "kubernetes"]
    assert {r.cloud.__class__.__name__ for r in _load(res, num_nodes=4).resources} == {
        "Lambda",
        "AWS",
        "GCP",
        "Kubernetes",
    }
    with pytest.raises(ConfigError, match="no cloud offering RTX4090 can run 2 nodes on spot"):
        sky_resources(parse_gpu("RTX4090"), None, True, 100, nodes=2)
    with pytest.raises(ConfigError, match="RunPod cannot run multi-node"):
        sky_resources(parse_gpu("RTX4090"), "runpod", False, 100, nodes=2)


def test_duplicate_cloud_names_collapse():
    """H100-SXM and H100-PCIE are both "H100" on Kubernetes: one entry."""
    res = sky_resources(parse_gpu("H100-SXM,H100-PCIE"), "kubernetes", False, 100)
    assert res == {"disk_size": 100, "cloud": "kubernetes", "accelerators": "H100:1"}


def test_images():
    res = sky_resources(
        parse_gpu("RTXA6000"), "lambda", False, 100, image="docker:nvcr.io/nvidia/pytorch:24.10-py3"
    )
    assert res["image_id"] == "docker:nvcr.io/nvidia/pytorch:24.10-py3"
    _load(res)
    with pytest.raises(ConfigError, match="Lambda cannot boot a custom machine image"):
        sky_resources(parse_gpu("RTXA6000"), "lambda", False, 100, image="ami-0123")
    res = sky_resources(parse_gpu("RTXA6000"), None, False, 100, image="ami-0123")
    assert [e["cloud"] for e in res["any_of"]] == ["runpod", "kubernetes"]


@pytest.mark.parametrize("disk", [0, -5, 1.5, "100", True])
def test_disk_size_must_be_a_positive_int(disk):
    with pytest.raises(ConfigError, match="disk size"):
        sky_resources(parse_gpu("H100"), "aws", False, disk)


def test_resources_refuse_like_check_combination():
    with pytest.raises(ConfigError, match="Lambda has no spot"):
        sky_resources(parse_gpu("H100:8"), "lambda", True, 100)
    with pytest.raises(ConfigError, match="not offered on gcp"):
        sky_resources(parse_gpu("RTX5090"), "gcp", False, 100)
    with pytest.raises(ConfigError, match="unknown cloud"):
        sky_resources(parse_gpu("RTX5090"), "vast", False, 100)


def test_resources_render_as_yaml_skypilot_reads(tmp_path):
    """The way render.py writes them: yaml.safe_dump into the task file, read back by sky.Task.from_yaml."""
    import sky
    import yaml

    res = sky_resources(parse_gpu("RTX5090,RTX4090:1"), None, True, 100, image="docker:pytorch/pytorch")
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "resources": res, "run": "echo"}, sort_keys=False))
    task = sky.Task.from_yaml(str(path))
    assert [r.accelerators for r in task.resources] == [{"RTX5090": 1}, {"RTX4090": 1}]
    assert all(r.use_spot and r.image_id for r in task.resources)


def test_gpu_is_hashable_and_frozen():
    gpu = CATALOG["B200"]
    assert isinstance(gpu, Gpu) and hash(gpu) == hash(CATALOG["B200"])
    with pytest.raises(AttributeError):
        gpu.memory_gb = 1  # type: ignore[misc]
    assert re.fullmatch(r"[A-Z0-9-]+", gpu.name)
