"""The GPUs lmctl rents (one catalog: `--gpu` names, memory, peak, per-cloud names, torch device names), peak
dense bf16 throughput for MFU, and a rough fp32 figure for CPU cores. Standard library only: no torch, and
the CLI imports it through orchestrator/gpus.py.

Peaks are dense (no sparsity) bf16 with FP32 accumulate, from the vendors' data sheets. Memory: data sheets;
B200 180 GB is what SkyPilot's own fetchers record (fetch_lambda_cloud.py 184320 MiB, fetch_gcp.py
180 * 1024) and NVIDIA's DGX B200 (1,440 GB over 8 GPUs).

A bare name means the SXM part everywhere, as on AWS, GCP and Lambda and in torch's device names: "H100" is
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
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

DEFAULT_MFU = 0.40  # the share of peak FLOP/s a plan (and a launch estimate) assumes training reaches

# fp32 FLOP/s of one CPU core in matmuls, for estimates only (is a local run minutes or months?): a core with
# AVX2 FMA at ~3 GHz peaks near 100 GFLOP/s; AVX-512 cores reach about twice that (oneDNN, ~205 GFLOP/s a core
# on the 2-core EPYC the tests run on: model/onednn.py). CPUs have no data sheet figure torch reaches.
CPU_CORE_FLOPS = 100e9


@dataclass(frozen=True)
class Gpu:
    name: str  # canonical name --gpu takes, e.g. "H100-SXM"
    memory_gb: int  # per GPU, as the vendor states it
    peak_tflops: float  # dense bf16 with FP32 accumulate, per GPU
    devices: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that mean this GPU (any case)
    clouds: dict[str, str] = field(hash=False)  # cloud -> SkyPilot's accelerator name there; absent: none
    aliases: tuple[str, ...] = ()


# Bare "A100" and "H100" device names are catch-alls (every A100 peaks alike; an unnamed H100 is taken for
# the SXM part); a GH200's GPU (an H100 or H200 die) peaks like an H200.
_GPUS = (
    Gpu("RTX5090", 32, 209.5, ("RTX 5090",), {"runpod": "RTX5090", "kubernetes": "RTX5090"}),
    Gpu("RTX4090", 24, 165.2, ("RTX 4090",), {"runpod": "RTX4090", "kubernetes": "RTX4090"}),
    Gpu("RTXA6000", 48, 154.8, ("A6000",), {"runpod": "RTXA6000", "lambda": "A6000", "kubernetes": "A6000"},
        ("A6000",)),
    Gpu("L40S", 48, 362.0, ("L40S",), {"runpod": "L40S", "aws": "L40S", "kubernetes": "L40S"}),
    Gpu("A100", 40, 312.0, ("A100-SXM4-40GB", "A100"),
        {"lambda": "A100", "aws": "A100", "gcp": "A100", "kubernetes": "A100"},
        ("A100-40GB", "A100-SXM", "A100-40GB-SXM")),
    Gpu("A100-PCIE", 40, 312.0, ("A100-PCIE-40GB",), {"lambda": "A100", "kubernetes": "A100"},
        ("A100-40GB-PCIE",)),
    Gpu("A100-80GB", 80, 312.0, ("A100-SXM4-80GB",),
        {"runpod": "A100-80GB-SXM", "lambda": "A100-80GB", "aws": "A100-80GB", "gcp": "A100-80GB",
         "kubernetes": "A100-80GB"},
        ("A100-80GB-SXM", "A100-SXM-80GB")),
    Gpu("A100-80GB-PCIE", 80, 312.0, ("A100 80GB PCIe",), {"runpod": "A100-80GB", "kubernetes": "A100-80GB"},
        ("A100-PCIE-80GB",)),
    Gpu("H100-SXM", 80, 989.0, ("H100 80GB HBM3", "H100"),
        {"runpod": "H100-SXM", "lambda": "H100", "aws": "H100", "gcp": "H100", "kubernetes": "H100"},
        ("H100", "H100-80GB", "H100-SXM5")),
    Gpu("H100-PCIE", 80, 756.0, ("H100 PCIe",), {"runpod": "H100", "lambda": "H100", "kubernetes": "H100"}),
    Gpu("H100-NVL", 94, 835.0, ("H100 NVL",), {"runpod": "H100-NVL", "kubernetes": "H100"}),
    Gpu("H200", 141, 989.0, ("H200", "GH200"),
        {"runpod": "H200-SXM", "aws": "H200", "gcp": "H200", "kubernetes": "H200"}, ("H200-SXM",)),
    Gpu("B200", 180, 2250.0, ("B200",),
        {"runpod": "B200", "lambda": "B200", "aws": "B200", "gcp": "B200", "kubernetes": "B200"}),
)  # fmt: skip

CATALOG: dict[str, Gpu] = {g.name: g for g in _GPUS}


def name_key(name: str) -> str:
    """Matching key of a --gpu name: case, spaces, '-' and '_' do not matter ("rtx-5090" == "RTX5090")."""
    return re.sub(r"[\s_\-]+", "", name).upper()


NAMES: dict[str, Gpu] = {}  # name_key of every canonical name and alias -> its GPU
for _g in _GPUS:
    for _n in (_g.name, *_g.aliases):
        assert NAMES.get(name_key(_n), _g) is _g, f"GPU name {_n!r} is ambiguous"
        NAMES[name_key(_n)] = _g

# (lower-cased device-name substring, GPU); the first match wins, so the longest (most specific) go first
_DEVICES = sorted(((d.lower(), g) for g in _GPUS for d in g.devices), key=lambda dg: -len(dg[0]))


def gpu_for_device(device_name: str) -> Gpu | None:
    """The catalog GPU a torch.cuda.get_device_name() (or nvidia-smi) name means, or None when unknown."""
    return next((g for d, g in _DEVICES if d in device_name.lower()), None)


def peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s for a CUDA device name, or None when unknown (CPUs included)."""
    gpu = gpu_for_device(device_name)
    return None if gpu is None else gpu.peak_tflops * 1e12


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a container or taskset may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_peak_flops(cores: int | None = None) -> float:
    """Rough peak fp32 FLOP/s of `cores` CPU cores (default: cpu_cores())."""
    return (cores or cpu_cores()) * CPU_CORE_FLOPS
