"""Peak dense bf16 throughput of the GPUs lmctl rents, for MFU; a rough fp32 figure for CPU cores. No torch
import.

Figures are dense (no sparsity) bf16 with FP32 accumulate, from the vendors' data sheets.
"""

from __future__ import annotations

import os

# fp32 FLOP/s of one CPU core in matmuls, for estimates only (is a local run minutes or months?): a core with
# AVX2 FMA at ~3 GHz peaks near 100 GFLOP/s; AVX-512 cores reach about twice that (oneDNN, ~205 GFLOP/s a core
# on the 2-core EPYC the tests run on: model/onednn.py). CPUs have no data sheet figure torch reaches.
CPU_CORE_FLOPS = 100e9

# (substring of torch.cuda.get_device_name(), TFLOPS); the first match wins, so specific names go first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 5090", 209.5),
    ("RTX 4090", 165.2),
    ("RTX A6000", 154.8),
    ("A6000", 154.8),
]


def peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s for a CUDA device name, or None when unknown (CPUs included)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a container or taskset may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_peak_flops(cores: int | None = None) -> float:
    """Rough peak fp32 FLOP/s of `cores` CPU cores (default: cpu_cores())."""
    return (cores or cpu_cores()) * CPU_CORE_FLOPS
