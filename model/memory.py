"""GPU memory of a training step, and the checkpointing and micro-batch that train fastest within it.

Pure arithmetic (no torch): `lmctl plan` shows it before anything is rented, a cloud launch writes its choice
into the run's config, and train() resolves `activation_checkpointing: auto` with it on the GPU it got.

Bytes per GPU, for what model/train.py holds at its peak (the start of a micro-batch's backward, the previous
micro-batches' gradients already there). N = param_count, M = matmul_params, W = world size, T = micro-batch x
seq_len tokens per forward, L layers, d = d_model, f = d_ff, kv = n_kv_heads x head_dim, H = n_heads,
V = vocab_size, B = one block's parameters (Bm of them in matmuls), R = the root's (embeddings, head, norm):

  weights      unsharded (DDP, and FSDP on one GPU, which train.py does not shard): 4N fp32, + under bf16
               autocast the 2-byte copy of each matmul weight that a block keeps for backward: 2Bm for every
               block not checkpointed, and for the one being recomputed.
               FSDP over W > 1: 4N/W of shards + the gathered p-byte params of the root and two blocks,
               p(R + 2B).
  gradients    4N (DDP's buckets are views of them); FSDP: 4N/W + p(R + B) unsharded + 4B for the
               reduce-scatter.
  optimizer    AdamW's two fp32 moments: 8N, or 8N/W sharded.
  activations  T x (kept blocks x A + checkpointed blocks x r d + one recomputed block's A + head), per token:
                 A, compiled block   r d + 8 + 4H + a (6d + 3kv + 3f)
                 A, eager block      16d + 8 + 4H + a (5d + 3kv + 4f)
                 head                16d + 12: final norm, the loss's input gradient, token ids and targets
               a = 2 bytes in bf16, 4 in fp32 (the compute dtype); r = the residual stream's, 4 under DDP's
               autocast (the embedding output is fp32), 2 under FSDP's bf16 policy. Both block formulas are
               exactly what the decoder saves for backward on a CPU (tests/test_plan.py measures them); on an
               H200 the compiled figure is within 1% of the measured peaks (bench/results/gpu_check.json).
               fp32 with grouped-query attention on a GPU: K and V are expanded for the memory-efficient
               kernel (model/decoder.py), + a x 2d per kept block. SDPA keeps no T x T scores.
  loss         4Vd: the head's fp32 weight gradient, which the fused loss computes in forward and holds until
               backward. Its logits exist a chunk at a time, in forward only (decoder.LinearCrossEntropy).
  overhead     1.25 GiB of workspaces and allocator rounding (fitted on an H200) + 0.75 GiB of CUDA context,
               which lives outside the allocator.
  fits         total <= 90% of the GPU's memory.

Speed, to choose among what fits: recomputing a block costs its forward again (2Bm + 4HQT FLOPs a token, of
flops_per_token for the whole step), and a micro-batch of T tokens runs at T / (T + 700) of the GPU's
saturated rate (fitted on an H200 for the 1b shape: micro-batch 2 ran at 0.87 of 16).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import CHECKPOINT_LEVELS, RunSpec, flops_per_token, layer_matmul_params, param_count

GIB = 1 << 30
USABLE_FRACTION = 0.90
WORKSPACE_BYTES = int(1.25 * GIB)
CONTEXT_BYTES = int(0.75 * GIB)
LEVELS = CHECKPOINT_LEVELS
PARALLELS = ("ddp", "fsdp")
SATURATION_TOKENS = 700


@dataclass
class Memory:
    """Per-GPU bytes of one strategy at one micro-batch."""

    strategy: str  # "ddp", "ddp+selective", "fsdp+full", ...
    micro_batch: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    loss: int
    overhead: int
    total: int
    fits: bool
    max_micro_batch: int = 0  # the largest micro-batch that fits and splits the global batch; 0: none

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated() should show: all of it but the CUDA context."""
        return self.total - CONTEXT_BYTES


def strategy_name(parallel: str, level: str) -> str:
    return parallel if level == "none" else f"{parallel}+{level}"


def parse_strategy(strategy: str) -> tuple[str, str]:
    parallel, _, level = strategy.partition("+")
    if parallel not in PARALLELS or (level or "none") not in LEVELS:
        known = ", ".join(strategy_name(p, lv) for p in PARALLELS for lv in LEVELS)
        raise ValueError(f"unknown strategy {strategy!r}; use one of {known}")
    return parallel, level or "none"


STRATEGIES = tuple(strategy_name(p, lv) for p in PARALLELS for lv in LEVELS)


def checkpointed_blocks(level: str, n_layers: int) -> int:
    """How many blocks recompute in backward (model.decoder: selective is every other block, odd ones)."""
    return {"none": 0, "selective": n_layers // 2, "full": n_layers}[level]


def bf16(spec: RunSpec) -> bool:
    return spec.train.precision in ("auto", "bf16")  # auto is bf16 on a GPU, which is what is planned for


def block_activation_bytes(spec: RunSpec, a: int, r: int, compiled: bool) -> int:
    """A: bytes one block keeps for backward per token (see the module doc)."""
    m = spec.model
    d, f, kv, h = m.d_model, m.d_ff, m.n_kv_heads * m.head_dim, m.n_heads
    if compiled:
        base = r * d + 8 + 4 * h + a * (6 * d + 3 * kv + 3 * f)
    else:
        base = 16 * d + 8 + 4 * h + a * (5 * d + 3 * kv + 4 * f)
    if a == 4 and m.n_kv_heads != m.n_heads:  # fp32 GQA on a GPU: K and V expanded for the efficient kernel
        base += a * 2 * d
    return base


def head_activation_bytes(spec: RunSpec) -> int:
    """Per token outside the blocks: final norm, the loss's input gradient, token ids and targets."""
    return 16 * spec.model.d_model + 12


def step_memory(spec: RunSpec, strategy: str, world: int, micro_batch: int, gpu_bytes: int) -> Memory:
    """The module doc's formula for one of STRATEGIES on a GPU of gpu_bytes."""
    parallel, level = parse_strategy(strategy)
    m = spec.model
    half = bf16(spec)
    sharded = parallel == "fsdp" and world > 1  # model/train.py: FSDP on one GPU does not shard
    a = 2 if half else 4  # compute dtype: autocast's, or FSDP's MixedPrecisionPolicy
    r = 2 if half and sharded else 4  # the residual stream
    p = 2 if half else 4  # FSDP's gathered params

    n = param_count(m)
    root = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model
    block = (n - root) // m.n_layers
    block_mm = layer_matmul_params(m)
    ckpt = checkpointed_blocks(level, m.n_layers)
    kept = m.n_layers - ckpt
    recompute = 1 if ckpt else 0
    if sharded:
        weights = 4 * n // world + p * (root + 2 * block)
        gradients = 4 * n // world + p * (root + block) + 4 * block
        optimizer = 8 * n // world
    else:
        weights = 4 * n + (2 * block_mm * (kept + recompute) if half else 0)
        gradients = 4 * n
        optimizer = 8 * n

    per_block = block_activation_bytes(spec, a, r, spec.train.compile)
    per_token = kept * per_block + ckpt * r * m.d_model + recompute * per_block + head_activation_bytes(spec)
    activations = micro_batch * m.seq_len * per_token
    loss = 4 * m.vocab_size * m.d_model
    overhead = WORKSPACE_BYTES + CONTEXT_BYTES
    total = weights + gradients + optimizer + activations + loss + overhead
    return Memory(
        strategy,
        micro_batch,
        weights,
        gradients,
        optimizer,
        activations,
        loss,
        overhead,
        total,
        total <= usable_bytes(gpu_bytes),
    )


def usable_bytes(gpu_bytes: int) -> int:
    return int(gpu_bytes * USABLE_FRACTION)


def micro_candidates(spec: RunSpec, world: int) -> list[int]:
    """Micro-batches that split the global batch evenly over `world`, largest first."""
    per_rank = spec.global_batch_seqs // world
    return [mb for mb in range(per_rank, 0, -1) if per_rank % mb == 0]


def max_fitting_micro(
    spec: RunSpec, strategy: str, world: int, gpu_bytes: int, upto: int | None = None
) -> int:
    """Largest micro-batch (<= upto) that splits the global batch and fits; 0 when none does."""
    for mb in micro_candidates(spec, world):
        if (upto is None or mb <= upto) and step_memory(spec, strategy, world, mb, gpu_bytes).fits:
            return mb
    return 0


def relative_speed(spec: RunSpec, level: str, micro_batch: int) -> float:
    """Useful tokens/s relative to a saturated GPU with no recomputation (see the module doc)."""
    m = spec.model
    block_forward = 2 * layer_matmul_params(m) + 4 * m.n_heads * m.head_dim * m.seq_len
    recompute = checkpointed_blocks(level, m.n_layers) * block_forward / flops_per_token(m)
    tokens = micro_batch * m.seq_len
    return tokens / (tokens + SATURATION_TOKENS) / (1 + recompute)


def choose(spec: RunSpec, world: int, gpu_bytes: int) -> tuple[str, int] | None:
    """(activation checkpointing, micro-batch) that fits and trains fastest; None when nothing fits.

    `auto` chooses both; a level the config names is kept and only the micro-batch is chosen (never above the
    config's). Ties go to the one using less memory.
    """
    t = spec.train
    levels = LEVELS if t.activation_checkpointing == "auto" else (t.activation_checkpointing,)
    best = None
    for level in levels:
        strategy = strategy_name(t.parallel, level)
        upto = None if t.activation_checkpointing == "auto" else t.micro_batch_size
        mb = max_fitting_micro(spec, strategy, world, gpu_bytes, upto)
        if mb:
            key = (relative_speed(spec, level, mb), -step_memory(spec, strategy, world, mb, gpu_bytes).total)
            if best is None or key > best[0]:
                best = (key, level, mb)
    return None if best is None else (best[1], best[2])
