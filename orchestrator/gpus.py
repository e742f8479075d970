"""GPUs lmctl can rent: `--gpu` parsing, what each cloud refuses, and SkyPilot `resources:`.

Imports only the standard library, ConfigError and model/hardware.py, so the CLI stays instant.

The catalog (names, aliases, memory, peaks, each cloud's accelerator names and where they come from) is
model/hardware.py's; `--gpu` takes its names and aliases ignoring case, spaces, '-' and '_' ("H100" is SXM).

Which cloud offers how many GPUs per node (e.g. AWS p4d only comes with 8) is SkyPilot's catalog's
business: its optimizer fails the launch when no instance matches, before anything is billed.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from model.errors import ConfigError
from model.hardware import CATALOG, NAMES, Gpu, name_key  # CATALOG and Gpu: importers may take them from here

CLOUDS = ("runpod", "lambda", "aws", "gcp", "kubernetes")
COUNTS = (1, 2, 4, 8)  # GPUs per node
MAX_NODES = 64


def find_gpu(name: str) -> Gpu:
    """The catalog entry for a canonical name or alias; ConfigError naming the known ones otherwise."""
    gpu = NAMES.get(name_key(name))
    if gpu is None:
        close = difflib.get_close_matches(name_key(name), list(NAMES), n=1, cutoff=0.6)
        hint = f" (did you mean {NAMES[close[0]].name}?)" if close else ""
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
