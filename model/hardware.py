"""Peak dense bf16 throughput of the GPUs lmctl rents, for MFU. No torch import.

Figures are dense (no sparsity) bf16 with FP32 accumulate, from the vendors' data sheets.
"""

from __future__ import annotations

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
