"""fp32 linear layers on CPU through oneDNN instead of MKL.

Why: on CPUs where MKL takes its AVX2 path (AMD EPYC, for one), torch.mm peaks at about half of
what the same cores do with AVX-512; oneDNN, which ships inside torch, uses AVX-512 there. On the
2-core EPYC these tests run on that is ~410 vs ~195 GFLOP/s, and ~1.7x faster CPU training.

The kernel is a private torch op, so it is wrapped as a custom op (torch.compile can trace it) with
its own backward, checked once against F.linear at import, and bypassed whenever it is missing,
wrong, or the call is not plain fp32 on CPU (autocast, GPUs and other dtypes use F.linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ENABLED = True  # benchmarks flip this to compare with MKL


@torch.library.custom_op("lmctl::mm_nt", mutates_args=())
def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D fp32 CPU tensors, by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


@mm_nt.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor):
    a, b = ctx.saved_tensors
    return mm_nt(grad, b.t()), mm_nt(grad.t(), a.t())  # d(a) = grad @ b, d(b) = grad.T @ a


mm_nt.register_autograd(_backward, setup_context=_save_inputs)


def _self_check() -> bool:
    """The op exists and agrees with F.linear, forward and backward."""
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(33, 17, generator=g, requires_grad=True)
        b = torch.randn(9, 17, generator=g, requires_grad=True)
        out = mm_nt(a, b)
        out.square().sum().backward()
        got = (out.detach(), a.grad.clone(), b.grad.clone())
        a.grad = b.grad = None
        ref = F.linear(a, b)
        ref.square().sum().backward()
        want = (ref, a.grad, b.grad)
        return all(torch.allclose(x, y, rtol=1e-4, atol=1e-4) for x, y in zip(got, want, strict=True))
    except Exception:  # missing op, unsupported CPU, changed signature: fall back quietly
        return False


AVAILABLE = torch.backends.mkldnn.is_available() and _self_check()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias, by oneDNN where that is valid and faster."""
    if (
        ENABLED
        and AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    ):
        return mm_nt(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)
