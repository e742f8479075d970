"""GPUs lmctl can rent: the catalog, `--gpu` parsing, what each cloud refuses, and SkyPilot `resources:`.

Imports only the standard library and ConfigError, so the CLI stays instant.

Canonical names (what `--gpu` takes; matching ignores case, spaces, '-' and '_'):

    RTX5090, RTX4090, RTXA6000 (alias A6000), L40S,
    A100 (40 GB SXM4), A100-PCIE (40 GB PCIe), A100-80GB (80 GB SXM4, alias A100-80GB-SXM),
    A100-80GB-PCIE, H100-SXM (alias H100), H100-PCIE, H100-NVL, H200 (alias H200-SXM), B200.

A bare name means the SXM part everywhere, as on AWS, GCP and Lambda and in model/hardware.py: "H100" is
the H100 SXM (989 TFLOPS) and "A100-80GB" the SXM4 80 GB. RunPod's catalog names differ (its "H100" is
the PCIe card and its "A100-80GB" the PCIe card): the per-cloud names below translate, so `--gpu H100`
on RunPod asks SkyPilot for RunPod's "H100-SXM".

Where each per-cloud accelerator name comes from (SkyPilot 0.14.1, catalog schema v8):
- runpod: sky/provision/runpod/utils.py GPU_NAME_MAP and sky/catalog/data_fetchers/fetch_runpod.py
  (display name with "RTX " -> "RTX", spaces -> "-", and the overrides A100-PCIe -> A100-80GB,
  A100-SXM -> A100-80GB-SXM, H100-PCIe -> H100). RunPod has no 40 GB A100.
- lambda: sky/catalog/data_fetchers/fetch_lambda_cloud.py (instance gpu_<n>x_<gpu>_... -> GPU upper-cased;
  gpu_8x_a100_80gb_sxm4 -> A100-80GB). Lambda names both H100 forms "H100" (gpu_1x_h100_pcie and
  gpu_<n>x_h100_sxm5) and both 40 GB A100 forms "A100", so a 1-GPU Lambda request may get either form.
- aws: sky/catalog/data_fetchers/fetch_aws.py (EC2's GPU names plus its fix-ups): A100 = p4d,
  A100-80GB = p4de, H100 = p5 (p5.4xlarge has 1 GPU), H200 = p5e/p5en, B200 = p6-b200 and L40S = g6e.
  The B200 and L40S names are EC2's own GpuInfo names, not checked against a downloaded catalog.
- gcp: sky/catalog/data_fetchers/fetch_gcp.py: A100 (a2-highgpu), A100-80GB (a2-ultragpu), H100
  (a3-highgpu), H200 (a3-ultragpu), B200 (a4). GCP offers no L40S, RTX or PCIe H100.
- kubernetes: the names SkyPilot derives from node labels (sky/utils/gpu_names.py CANONICAL_GPU_NAMES and
  GFDLabelFormatter in sky/provision/kubernetes/utils.py): RTX cards become "RTX5090"/"RTX4090", the
  RTX A6000 "A6000", and every H100 form matches "H100". What a cluster really has is up to the cluster.

Which cloud offers how many GPUs per node (e.g. AWS p4d only comes with 8) is SkyPilot's catalog's
business: its optimizer fails the launch when no instance matches, before anything is billed.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from model.errors import ConfigError

CLOUDS = ("runpod", "lambda", "aws", "gcp", "kubernetes")
COUNTS = (1, 2, 4, 8)  # GPUs per node
MAX_NODES = 64


@dataclass(frozen=True)
class Gpu:
    name: str  # canonical name --gpu takes, e.g. "H100-SXM"
    memory_gb: int  # per GPU, as the vendor states it
    peak_tflops: float  # dense bf16 with FP32 accumulate, per GPU (model/hardware.py has the same figures)
    clouds: dict[str, str] = field(hash=False)  # cloud -> SkyPilot's accelerator name there; absent: none
    aliases: tuple[str, ...] = ()


# Peaks: vendor data sheets, dense (no sparsity). Memory: data sheets; B200 180 GB is what SkyPilot's own
# fetchers record (fetch_lambda_cloud.py 184320 MiB, fetch_gcp.py 180 * 1024) and NVIDIA's DGX B200
# (1,440 GB over 8 GPUs).
_GPUS = (
    Gpu("RTX5090", 32, 209.5, {"runpod": "RTX5090", "kubernetes": "RTX5090"}),
    Gpu("RTX4090", 24, 165.2, {"runpod": "RTX4090", "kubernetes": "RTX4090"}),
    Gpu(
        "RTXA6000",
        48,
        154.8,
        {"runpod": "RTXA6000", "lambda": "A6000", "kubernetes": "A6000"},
        ("A6000",),
    ),
    Gpu("L40S", 48, 362.0, {"runpod": "L40S", "aws": "L40S", "kubernetes": "L40S"}),
    Gpu(
        "A100",
        40,
        312.0,
        {"lambda": "A100", "aws": "A100", "gcp": "A100", "kubernetes": "A100"},
        ("A100-40GB", "A100-SXM", "A100-40GB-SXM"),
    ),
    Gpu("A100-PCIE", 40, 312.0, {"lambda": "A100", "kubernetes": "A100"}, ("A100-40GB-PCIE",)),
    Gpu(
        "A100-80GB",
        80,
        312.0,
        {
            "runpod": "A100-80GB-SXM",
            "lambda": "A100-80GB",
            "aws": "A100-80GB",
            "gcp": "A100-80GB",
            "kubernetes": "A100-80GB",
        },
        ("A100-80GB-SXM", "A100-SXM-80GB"),
    ),
    Gpu(
        "A100-80GB-PCIE",
        80,
        312.0,
        {"runpod": "A100-80GB", "kubernetes": "A100-80GB"},
        ("A100-PCIE-80GB",),
    ),
    Gpu(
        "H100-SXM",
        80,
        989.0,
        {"runpod": "H100-SXM", "lambda": "H100", "aws": "H100", "gcp": "H100", "kubernetes": "H100"},
        ("H100", "H100-80GB", "H100-SXM5"),
    ),
    Gpu("H100-PCIE", 80, 756.0, {"runpod": "H100", "lambda": "H100", "kubernetes": "H100"}),
    Gpu("H100-NVL", 94, 835.0, {"runpod": "H100-NVL", "kubernetes": "H100"}),
    Gpu(
        "H200",
        141,
        989.0,
        {"runpod": "H200-SXM", "aws": "H200", "gcp": "H200", "kubernetes": "H200"},
        ("H200-SXM",),
    ),
    Gpu(
        "B200",
        180,
        2250.0,
        {"runpod": "B200", "lambda": "B200", "aws": "B200", "gcp": "B200", "kubernetes": "B200"},
    ),
)

CATALOG: dict[str, Gpu] = {g.name: g for g in _GPUS}


def _key(name: str) -> str:
    """Matching key: case, spaces, '-' and '_' do not matter ("rtx-5090" == "RTX5090")."""
    return re.sub(r"[\s_\-]+", "", name).upper()


_LOOKUP: dict[str, Gpu] = {}
for _g in _GPUS:
    for _n in (_g.name, *_g.aliases):
        assert _LOOKUP.get(_key(_n), _g) is _g, f"GPU name {_n!r} is ambiguous"
        _LOOKUP[_key(_n)] = _g


def find_gpu(name: str) -> Gpu:
    """The catalog entry for a canonical name or alias; ConfigError naming the known ones otherwise."""
    gpu = _LOOKUP.get(_key(name))
    if gpu is None:
        close = difflib.get_close_matches(_key(name), list(_LOOKUP), n=1, cutoff=0.6)
        hint = f" (did you mean {_LOOKUP[close[0]].name}?)" if close else ""
        raise ConfigError(f"unknown GPU {name.strip()!r}{hint}; known GPUs: {', '.join(CATALOG)}")
    return gpu


@dataclass(frozen=True)
class GpuRequest:
    gpus: tuple[Gpu, ...]  # preference order (--gpu RTX5090,RTX4090)
    count: int  # GPUs per node

    @property
    def primary(self) -> Gpu:
        """The first choice: what `lmctl plan` estimates with."""
        return self.gpus[0]

    def text(self) -> str:
        """Canonical spec that parse_gpu reads back to an equal request, e.g. "RTX5090,RTX4090:1"."""
        return f"{','.join(g.name for g in self.gpus)}:{self.count}"


def parse_gpu(text: str) -> GpuRequest:
    """`NAME[,NAME...][:COUNT]` -> GpuRequest; COUNT (GPUs per node) is 1, 2, 4 or 8, default 1."""
    spec = (text or "").strip()
    if not spec:
        raise ConfigError("--gpu is empty; give NAME[,NAME...][:COUNT], e.g. H100-SXM:8 or RTX5090,RTX4090")
    names_part, sep, count_part = spec.partition(":")
    count = 1
    if sep:
        count_part = count_part.strip()
        if not re.fullmatch(r"[0-9]+", count_part):  # ASCII: int() would also read "٨" as 8
            raise ConfigError(
                f"--gpu {spec!r}: the GPU count after ':' must be one of {', '.join(map(str, COUNTS))}"
            )
        count = int(count_part)
        if count not in COUNTS:
            raise ConfigError(
                f"--gpu {spec!r}: {count} GPUs per node is not allowed; use one of "
                f"{', '.join(map(str, COUNTS))} (--nodes for more)"
            )
    names = [n.strip() for n in names_part.split(",")]
    if any(not n for n in names):
        raise ConfigError(f"--gpu {spec!r}: empty GPU name; separate names with single commas")
    gpus: list[Gpu] = []
    for n in names:
        gpu = find_gpu(n)
        if gpu in gpus:
            raise ConfigError(f"--gpu {spec!r}: {gpu.name} is listed twice")
        gpus.append(gpu)
    return GpuRequest(tuple(gpus), count)


# ---------------------------------------------------------------- what each cloud cannot do

# cloud -> SkyPilot CloudImplementationFeatures value -> why. These are the entries of SkyPilot's own
# tables (_CLOUD_UNSUPPORTED_FEATURES in sky/clouds/{runpod,lambda_cloud,kubernetes}.py; AWS and GCP have
# none of these) for the features lmctl touches; tests/test_gpus.py checks the two agree.
UNSUPPORTED: dict[str, dict[str, str]] = {
    "runpod": {
        "multi-node": "RunPod cannot run multi-node clusters (SkyPilot has no inter-node networking there)",
        "storage_mounting": "RunPod cannot mount buckets (lmctl does not mount any: workers use boto3)",
    },
    "lambda": {
        "spot_instance": "Lambda has no spot instances",
        "image_id": "Lambda cannot boot a custom machine image (a 'docker:<image>' works)",
    },
    "kubernetes": {
        # SkyPilot lifts this for a cluster whose nodes carry spot labels; lmctl does not probe clusters.
        "spot_instance": "SkyPilot does not run spot on Kubernetes (only on clusters with spot node labels)",
    },
    "aws": {},
    "gcp": {},
}

# The features lmctl needs: storage mounting is deliberately absent (no bucket mounts anywhere).
MULTI_NODE, SPOT, IMAGE_ID = "multi-node", "spot_instance", "image_id"


def refusal(cloud: str, feature: str) -> str | None:
    """Why `cloud` cannot do `feature` (a CloudImplementationFeatures value), or None when it can."""
    return UNSUPPORTED.get(cloud, {}).get(feature)


def _norm_cloud(cloud: str | None) -> str | None:
    """'RunPod' -> 'runpod'; None (any cloud) stays None; ConfigError for a cloud lmctl does not know."""
    if cloud is None:
        return None
    name = str(cloud).strip().lower()
    if name not in CLOUDS:
        raise ConfigError(f"unknown cloud {cloud!r}; use one of {', '.join(CLOUDS)} (or none for any)")
    return name


def _blockers(cloud: str, nodes: int, spot: bool, image: str | None = None) -> list[str]:
    """Reasons `cloud` cannot run this launch shape (empty: it can)."""
    needs = [(MULTI_NODE, nodes > 1), (SPOT, spot), (IMAGE_ID, bool(image) and not _is_docker(image))]
    return [r for feature, wanted in needs if wanted and (r := refusal(cloud, feature))]


def _is_docker(image: str | None) -> bool:
    return bool(image) and image.startswith("docker:")


def viable_clouds(gpu: Gpu, cloud: str | None, nodes: int, spot: bool, image: str | None = None) -> list[str]:
    """Clouds (in CLOUDS order) that offer `gpu` and can run this shape; `cloud` narrows to that one."""
    cloud = _norm_cloud(cloud)
    candidates = [cloud] if cloud else list(CLOUDS)
    return [c for c in candidates if c in gpu.clouds and not _blockers(c, nodes, spot, image)]


def _check(req: GpuRequest, cloud: str | None, nodes: int, spot: bool, image: str | None = None) -> None:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise ConfigError(f"--nodes {nodes!r} is out of range; use 1 to {MAX_NODES}")
    cloud = _norm_cloud(cloud)
    if cloud is not None:
        for gpu in req.gpus:
            if cloud not in gpu.clouds:
                raise ConfigError(f"{gpu.name} is not offered on {cloud}; it is on {', '.join(gpu.clouds)}")
        blockers = _blockers(cloud, nodes, spot, image)
        if blockers:
            raise ConfigError(f"cannot launch on {cloud}: {'; '.join(blockers)}")
        return
    shape = _shape(nodes, spot, image)
    for gpu in req.gpus:
        if not viable_clouds(gpu, None, nodes, spot, image):
            why = "; ".join(f"{c}: {', '.join(_blockers(c, nodes, spot, image))}" for c in gpu.clouds)
            raise ConfigError(f"no cloud offering {gpu.name} can run {shape} ({why})")


def _shape(nodes: int, spot: bool, image: str | None) -> str:
    parts = [f"{nodes} nodes" if nodes > 1 else "1 node"]
    if spot:
        parts.append("on spot")
    if image and not _is_docker(image):
        parts.append(f"with image {image}")
    return " ".join(parts)


def check_combination(req: GpuRequest, cloud: str | None, nodes: int, spot: bool) -> None:
    """Refuse, before anything is launched, a GPU/cloud/nodes/spot combination that cannot run.

    Refused: an unknown cloud; a GPU the chosen cloud does not offer; nodes outside 1..64; multi-node on
    RunPod; spot on Lambda or Kubernetes. With no cloud chosen, every GPU of the request needs at least one
    cloud that offers it and can run the shape (sky_resources lists only those clouds). RunPod cannot mount
    buckets either, which is not a refusal: lmctl mounts nothing (workers talk to the store with boto3).
    """
    _check(req, cloud, nodes, spot)


def sky_resources(
    req: GpuRequest,
    cloud: str | None,
    spot: bool,
    disk_size: int,
    image: str | None = None,
    *,
    nodes: int = 1,
) -> dict:
    """The task YAML's `resources:` mapping for this request (refused as check_combination refuses).

    One GPU on one cloud: `cloud` + `accelerators: "<that cloud's name>:<count>"`. One GPU on any cloud:
    `any_of` every cloud that offers it and can run the shape (SkyPilot's optimizer takes the cheapest).
    Several GPUs: `ordered` in preference order, GPU-major, then clouds in CLOUDS order. `disk_size` is
    always explicit (SkyPilot's default, 256 GB, is billed by the hour); `use_spot` only when spot;
    `image_id` when given ('docker:<image>' runs on every cloud here; another image skips Lambda).
    """
    if isinstance(disk_size, bool) or not isinstance(disk_size, int) or disk_size < 1:
        raise ConfigError(f"disk size {disk_size!r} must be a whole number of GB >= 1")
    cloud = _norm_cloud(cloud)
    _check(req, cloud, nodes, spot, image)
    out: dict = {"disk_size": disk_size}
    if spot:
        out["use_spot"] = True
    if image:
        out["image_id"] = image
    entries: list[dict] = []
    for gpu in req.gpus:
        for c in viable_clouds(gpu, cloud, nodes, spot, image):
            entry = {"cloud": c, "accelerators": f"{gpu.clouds[c]}:{req.count}"}
            if entry not in entries:  # e.g. H100-SXM,H100-PCIE: both are "H100" on Kubernetes
                entries.append(entry)
    if len(entries) == 1:
        out.update(entries[0])
    elif len(req.gpus) == 1:
        out["any_of"] = entries
    else:
        out["ordered"] = entries
    return out
