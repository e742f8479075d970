"""Sampling from a Decoder with its KV cache: one prefill of the prompt, then one token per step."""

from __future__ import annotations

import math

import torch

from model.decoder import Decoder

MAX_CONTEXT_FACTOR = 4  # past the trained context RoPE extrapolates poorly; the KV cache grows with it


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside the k largest of each row become -inf."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p; the rest -> -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # a token is kept if the mass before it is still short of p
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.inference_mode()
def generate(
    model: Decoder,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """prompt [B, T] -> [B, T + n], n <= max_new_tokens; temperature 0 is greedy.

    Stops early once every row has produced eot_id; rows that finished earlier are padded with it.
    """
    if not (math.isfinite(temperature) and temperature >= 0):  # nan compares false to everything
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(
            f"prompt_ids must be [batch, tokens] with at least one token, got {tuple(prompt_ids.shape)}"
        )
    limit = MAX_CONTEXT_FACTOR * model.cfg.seq_len
    if prompt_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} with a {prompt_ids.shape[1]}-token prompt exceeds {limit} "
            f"tokens, {MAX_CONTEXT_FACTOR} x the model's trained context of {model.cfg.seq_len}"
        )

    was_training = model.training
    model.eval()
    B, T = prompt_ids.shape
    cache = model.new_cache(B, T + max_new_tokens, device=prompt_ids.device)
    out, step_ids = prompt_ids, prompt_ids
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new_tokens):
        logits = model(step_ids, cache=cache)[:, -1].float()
        if temperature == 0:
            next_ids = logits.argmax(dim=-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                logits = top_k_filter(logits, top_k)
            if top_p is not None:
                logits = top_p_filter(logits, top_p)
            next_ids = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
        if eot_id is not None:
            next_ids = next_ids.masked_fill(done, eot_id)
            done |= next_ids == eot_id
        step_ids = next_ids[:, None]
        out = torch.cat((out, step_ids), dim=1)
        if eot_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return out
