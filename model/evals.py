"""What a model can do beyond its loss: bits per byte, multiple-choice tasks, samples.

- Bits per byte: the held-out loss in bits over the bytes of text the targets stand for (end-of-text and
  other special tokens are no text and are left out), so runs with different tokenizers compare.
- Multiple-choice tasks, scored as HellaSwag, ARC and PIQA are: the model's log-likelihood of each choice
  after the context; `acc` picks the largest sum, `acc_norm` the largest per byte of the choice. A task is a
  local JSONL file (`context`, `choices`, `label`) anyone can write, or a known hub task read through
  `datasets` (HUB_TASKS). The examples are split over the ranks; every rank makes the same number of
  forward calls, so sharded (FSDP) models work.
- Samples: a few fixed prompts continued greedily, to see a model come alive.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from model.tasks import Example
from model.tokenizer import Tokenizer

# ---------------------------------------------------------------- bits per byte


def text_bytes(tok: Tokenizer, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[vocab_size] int64: the bytes of text each id stands for; 0 for special tokens and unused ids."""
    lengths = tok.text_bytes() + [0] * max(0, vocab_size - tok.vocab_size)
    return torch.tensor(lengths[:vocab_size], dtype=torch.int64, device=device)


def bits_per_byte(nats: float, n_bytes: float) -> float:
    return nats / (math.log(2) * max(n_bytes, 1.0))


# ---------------------------------------------------------------- multiple-choice tasks (model/tasks.py)


def _choice_batch(tok: Tokenizer, ex: Example, max_len: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Inputs and targets of every choice after the context (targets -1 outside the choice), padded to one
    length, the context cut from the left to fit max_len; and each choice's byte length."""
    ctx = tok.encode(ex.context)
    rows = []
    for choice in ex.choices:
        ids = tok.encode(choice)[:max_len]
        seq = (ctx + ids)[-(max_len + 1) :]
        rows.append((seq, len(ids)))
    width = max(len(seq) - 1 for seq, _ in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (seq, n) in enumerate(rows):
        x[r, : len(seq) - 1] = torch.tensor(seq[:-1])
        y[r, len(seq) - 1 - n : len(seq) - 1] = torch.tensor(seq[-n:])
    return x, y, [max(1, len(c.encode())) for c in ex.choices]


@torch.inference_mode()
def score_task(
    model: torch.nn.Module,
    tok: Tokenizer,
    examples: list[Example],
    max_len: int,
    device: torch.device,
    autocast: Callable = contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """{acc, acc_norm, n, chance} over `examples`, split over the ranks (all-reduced)."""
    was_training = model.training
    model.eval()
    right = torch.zeros(3, dtype=torch.float64, device=device)  # acc, acc_norm, chance
    per_rank = math.ceil(len(examples) / world_size)
    for k in range(per_rank):  # the same number of forward calls on every rank
        i = rank * per_rank + k
        real = i < len(examples)
        ex = examples[i if real else 0]
        x, y, n_bytes = _choice_batch(tok, ex, max_len)
        with autocast():
            logits = model(x.to(device))
        logp = torch.log_softmax(logits.float(), dim=-1)
        y = y.to(device)
        picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y != -1)
        sums = picked.sum(dim=1)
        if real:
            right[0] += float(int(sums.argmax()) == ex.label)
            right[1] += float(int((sums / torch.tensor(n_bytes, device=device)).argmax()) == ex.label)
            right[2] += 1.0 / len(ex.choices)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(right)
    model.train(was_training)
    n = len(examples)
    return {
        "acc": float(right[0]) / n,
        "acc_norm": float(right[1]) / n,
        "chance": float(right[2]) / n,
        "n": n,
    }


# ---------------------------------------------------------------- samples


@torch.inference_mode()
def samples(
    model: torch.nn.Module, tok: Tokenizer, prompts: list[str], max_new_tokens: int, device: torch.device
) -> dict[str, str]:
    """Each prompt continued greedily (the same on every rank; a sharded model needs all ranks to run it)."""
    from model.generate import generate

    out = {}
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt) or [tok.eot_id]], device=device)
        new = generate(model, ids, max_new_tokens, temperature=0.0, eot_id=tok.eot_id)[0, ids.shape[1] :]
        out[prompt] = tok.decode([i for i in new.tolist() if i != tok.eot_id])
    return out
