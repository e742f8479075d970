"""Llama-style decoder: pre-norm RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Weights are laid out so that the Hugging Face Llama export is a rename plus a split of the fused
projections: rotary embeddings use the half-split ("rotate_half") convention, q/k/v are stacked
in one Linear as [q; k; v] and the MLP's gate/up as [gate; up]. One matmul instead of two or
three is measurably faster on small models, where per-op overhead is a large share of the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import onednn
from model.config import CHECKPOINT_LEVELS, ModelConfig

# Activation checkpointing levels: "selective" recomputes every other block, halving what the blocks keep for
# backward at ~1/6 more compute than none; "full" recomputes every block (~1/3 more).
CHECKPOINTING = CHECKPOINT_LEVELS
LOSS_CHUNK_ELEMENTS = 1 << 27  # logits per loss chunk: 512 MiB in fp32 (4096 tokens at a 32K vocabulary)

# ---------------------------------------------------------------- rotary embeddings


def rope_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] in fp32, both halves equal (the rotate_half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x [B, H, T, D] by the angles in cos/sin [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------- KV cache


@dataclass
class KVCache:
    """Keys and values of every layer, [B, n_kv_heads, max_len, head_dim], filled up to `length`."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, KV, T, D] of new positions; return all keys and values so far (views)."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ---------------------------------------------------------------- blocks


class Linear(nn.Linear):
    """Bias-free nn.Linear whose fp32 CPU matmuls go through oneDNN (see model/onednn.py)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn.linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, D).transpose(1, 2)
        q, k = apply_rope(qkv[:, : H + KV], cos, sin).split((H, KV), dim=1)  # q and k rotated in one go
        v = qkv[:, H + KV :]
        if cache is None:
            gqa = KV != H
            if gqa and q.is_cuda and q.dtype == torch.float32:
                # No fused CUDA kernel takes grouped K/V in fp32; the math fallback would keep T x T scores
                # (2 GiB a layer at the 1b shape). Expanded, the memory-efficient kernel runs.
                k, v, gqa = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1), False
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = cache.update(self.layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
            mask = None
            if T > 1:  # new token i sits at position length + i and sees every key up to there
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=KV != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.d_model, 2 * cfg.d_ff)
        self.down_proj = Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------- the model


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.checkpointing = "none"
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-style init; also (re)computes the rotary tables, so meta -> to_empty -> init_weights works."""
        if self.cfg.tie_embeddings:  # to_empty() replaces meta parameters one module at a time: re-tie
            self.lm_head.weight = self.tok_embeddings.weight
        self._build_rope(self.cfg.seq_len, self.lm_head.weight.device)
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                nn.init.ones_(p)
            else:
                residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                std = residual_std if residual else self.cfg.init_std
                nn.init.normal_(p, mean=0.0, std=std)

    def _build_rope(self, length: int, device) -> None:
        cos, sin = rope_tables(self.cfg.head_dim, length, self.cfg.rope_theta, device)
        self.rope_cos, self.rope_sin = cos, sin

    def set_activation_checkpointing(self, level: str | bool) -> None:
        """Recompute blocks' activations in backward instead of keeping them (training only): CHECKPOINTING.

        True means "full" and False "none".
        """
        level = {True: "full", False: "none"}.get(level, level)
        if level not in CHECKPOINTING:
            raise ValueError(f"activation checkpointing {level!r}: use one of {', '.join(CHECKPOINTING)}")
        self.checkpointing = level

    def _recomputes(self, layer: int) -> bool:
        if self.checkpointing == "none" or not (self.training and torch.is_grad_enabled()):
            return False
        return self.checkpointing == "full" or layer % 2 == 1

    def compile_blocks(self) -> None:
        """torch.compile each block, not the whole model: the blocks are alike, so one compiled graph serves
        them all (a short compile), and the untouched head and loss cannot force whole-model recompiles."""
        for block in self.layers:
            block.compile()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied weight is counted once

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        w = self.lm_head.weight
        shape = (batch_size, self.cfg.n_kv_heads, max_len, self.cfg.head_dim)
        k = [torch.zeros(shape, device=device or w.device, dtype=dtype or w.dtype) for _ in self.layers]
        v = [torch.zeros_like(t) for t in k]
        return KVCache(k, v)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V] of `idx`; or, given targets (-1 = ignore), the mean cross-entropy alone.

        Training asks for the loss only, so that no [B, T, V] logits outlive the step (LinearCrossEntropy).
        """
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start} used + {T} new do not fit")
        if start + T > self.rope_cos.shape[0]:  # generation past the trained length: extend the tables
            self._build_rope(max(2 * self.rope_cos.shape[0], start + T), idx.device)
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]

        x = self.tok_embeddings(idx)
        dev = idx.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        cos, sin = cos.to(dtype), sin.to(dtype)  # the dtype q/k will have, so RoPE does not upcast them
        for i, block in enumerate(self.layers):
            if self._recomputes(i):
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += T
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x)
        return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against targets (-1 = ignore), fused with its backward.

    The fp32 logits of a whole micro-batch would be the largest tensors of a step (2 GiB at 16K tokens and a
    32K vocabulary, and as much again for their gradient). Here a chunk of tokens at a time is projected,
    its loss and its logits' gradient (softmax - one-hot) computed at once, and that gradient turned into
    the chunk's input gradient and a share of the weight gradient right away; backward only scales them.
    The peak is one chunk's logits, with no second projection (a recomputing checkpoint would need one).
    Matmuls run in the compute dtype (bf16 under autocast) and the softmax in fp32, as autocast's own
    cross-entropy would; the weight gradient is summed over chunks in fp32.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grads: bool
    ) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        with torch.autocast(dev, enabled=False):
            w, xs = weight.to(dtype), x.to(dtype)
            count = (targets != -1).sum().clamp(min=1)
            chunk = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            grad_x = torch.empty_like(x) if grads else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads else None
            for s in range(0, x.shape[0], chunk):
                xc = xs[s : s + chunk]
                loss_sum, g = _softmax_cross_entropy(
                    onednn.linear(xc, w), targets[s : s + chunk], count, grads
                )
                total += loss_sum
                if not grads:  # evaluation: the loss alone
                    continue
                g = g.to(dtype)
                grad_x[s : s + chunk] = onednn.linear(g, w.t())  # g @ w
                grad_w += onednn.linear(g.t(), xc.t())  # g.T @ x
        if grads:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out.to(grad_x.dtype), grad_w * grad_out.to(grad_w.dtype), None, None


def _softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, grads: bool):
    """Summed cross-entropy of one chunk, and (if grads) the gradient of loss / count w.r.t. its logits."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    valid = targets != -1
    safe = targets.clamp(min=0).unsqueeze(1)
    loss_sum = -(logp.gather(1, safe).squeeze(1) * valid).sum()
    if not grads:
        return loss_sum, None
    g = logp.exp_()
    g.scatter_add_(1, safe, torch.full_like(safe, -1.0, dtype=g.dtype))
    g.mul_((valid / count).unsqueeze(1))
    return loss_sum, g


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of x @ weight.T (x [N, d], targets [N]), never holding [N, V] logits."""
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(x, weight, targets, grads)
