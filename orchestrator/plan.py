"""`lmctl plan`: will this config fit on this GPU, how fast will it train, how long and at what cost.

Memory per GPU, in bytes, for what model/train.py really holds (N = param_count, M = matmul_params,
W = world size, T = micro_batch x seq_len tokens per forward, L layers, d = d_model, f = d_ff,
kv = n_kv_heads x head_dim, H = n_heads, V = vocab_size):

  weights     DDP:  4N fp32 master weights + 2M, the bf16 copies autocast makes of every matmul weight
                    (kept for backward).
              FSDP: 4N/W fp32 shards + p(R + 2B): the all-gathered p-byte params (p = 2 in bf16) of the
                    root (embeddings, head, final norm: R params, gathered for the whole step) and of
                    two blocks (B params each: the one computing and the one prefetched).
  gradients   DDP:  4N fp32, plus 4N of DDP's all-reduce buckets when W > 1.
              FSDP: 4N/W fp32 shards + p(R + B) unsharded gradients of the root and of one block, + 4B
                    that block's fp32 copy for the reduce-scatter.
  optimizer   AdamW exp_avg + exp_avg_sq in fp32: 8N (DDP), 8N/W (FSDP).
  activations T x (L x A + head) without checkpointing; T x (L x r x d + A + head) with it, where
              A = 16d + 8 + 4H + a(5d + 3kv + 4f) bytes per token per block:
                16d + 8    each of the two RMSNorms keeps its input and its normalized output in fp32 and
                           an fp32 rstd (PyTorch's composite rms_norm upcasts; a fused kernel keeps less,
                           so this errs high)
                a x 2d     the normed inputs the qkv and gate_up matmuls keep, in the compute dtype (a)
                a x (d+2kv) the qkv projection (v is a view of it, kept by attention)
                a x (d+kv) the rotated q and k
                a x d      the attention output (= o_proj's input); 4H: attention's fp32 logsumexp
                a x 4f     gate|up (2f), silu(gate) (f) and silu(gate) x up (f)
              head = 8d + 4 + a x d + 16 per token: final norm, lm_head input, int64 token ids and
              targets. Blocks + head + the loss's 4V are exactly what a forward on the CPU saves for
              backward (tests/test_plan.py measures it). With checkpointing a block keeps only its input
              x (r bytes: the residual stream is fp32 under DDP's autocast, whose embedding output is
              fp32, and bf16 under FSDP) and one block is recomputed at a time. SDPA (flash attention)
              stores no T^2 attention matrix.
  logits      T x V x (a + 12): the a-byte logits the loop holds, the fp32 log-softmax output saved for
              backward, and the fp32 gradients of the log-probs and of the logits (the loss upcasts).
  overhead    1.5 GiB: CUDA context, cuBLAS/NCCL workspaces.
  fits        total <= 90% of the GPU's memory (the rest absorbs allocator fragmentation).

a = p = 2 bytes in bf16 ("auto" and "bf16" on a GPU), 4 in fp32. The checkpointed recompute and the loss
peak do not coincide, so with checkpointing the sum errs high by at most one block. train.py neither
shards nor autocasts when parallel=fsdp runs on one GPU; the model says so (fp32, unsharded).

Throughput: tokens/s = mfu x peak FLOP/s x W / flops_per_token; hours = token budget / tokens/s / 3600;
cost = hours x W x USD per GPU-hour.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from model.config import RunSpec, flops_per_token, human, matmul_params, param_count
from model.errors import ConfigError
from orchestrator.gpus import CATALOG, CLOUDS, Gpu, GpuRequest, check_combination, viable_clouds

PRICES_PATH = Path(__file__).resolve().parent.parent / "configs" / "pricing" / "prices.yaml"
GIB = 1 << 30
USABLE_FRACTION = 0.90
OVERHEAD_BYTES = int(1.5 * GIB)
STRATEGIES = ("ddp", "ddp+ckpt", "fsdp", "fsdp+ckpt")


# ---------------------------------------------------------------- memory


@dataclass
class Memory:
    """Per-GPU bytes of one strategy at one micro-batch."""

    strategy: str
    micro_batch: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    total: int
    fits: bool
    max_micro_batch: int  # the largest micro-batch that fits and splits the global batch; 0: none


def _bf16(spec: RunSpec) -> bool:
    return spec.train.precision in ("auto", "bf16")  # auto is bf16 on a GPU, which is what we plan for


def block_activation_bytes(spec: RunSpec, a: int) -> int:
    """A: bytes one block keeps for backward per token, compute dtype of `a` bytes (see the module doc)."""
    m = spec.model
    d, f, kv, h = m.d_model, m.d_ff, m.n_kv_heads * m.head_dim, m.n_heads
    return 16 * d + 8 + 4 * h + a * (5 * d + 3 * kv + 4 * f)


def head_activation_bytes(spec: RunSpec, a: int) -> int:
    """Per token outside the blocks: final norm, lm_head input, the int64 token ids and targets."""
    d = spec.model.d_model
    return 8 * d + 4 + a * d + 16


def strategy_memory(spec: RunSpec, strategy: str, world: int, micro_batch: int, gpu: Gpu) -> Memory:
    """The module doc's formula for one of STRATEGIES."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    m = spec.model
    parallel, ckpt = strategy.removesuffix("+ckpt"), strategy.endswith("+ckpt")
    bf16 = _bf16(spec)
    sharded = parallel == "fsdp" and world > 1
    autocast = bf16 and parallel == "ddp"  # train.py autocasts only outside FSDP
    a = 2 if autocast or (bf16 and sharded) else 4  # compute dtype (FSDP: its MixedPrecisionPolicy)
    r = 2 if bf16 and sharded else 4  # residual stream dtype
    p = 2 if bf16 else 4  # FSDP's all-gathered params

    n, mm = param_count(m), matmul_params(m)
    root = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model
    block = (n - root) // m.n_layers
    if sharded:
        weights = 4 * n // world + p * (root + 2 * block)
        gradients = 4 * n // world + p * (root + block) + 4 * block
        optimizer = 8 * n // world
    else:
        weights = 4 * n + (2 * mm if autocast else 0)
        gradients = 4 * n * (2 if world > 1 else 1)
        optimizer = 8 * n

    tokens = micro_batch * m.seq_len
    per_block = block_activation_bytes(spec, a)
    head = head_activation_bytes(spec, a)
    if ckpt:
        activations = tokens * (m.n_layers * r * m.d_model + per_block + head)
    else:
        activations = tokens * (m.n_layers * per_block + head)
    logits = tokens * m.vocab_size * (a + 12)
    total = weights + gradients + optimizer + activations + logits + OVERHEAD_BYTES
    fits = total <= usable_bytes(gpu)
    return Memory(
        strategy,
        micro_batch,
        weights,
        gradients,
        optimizer,
        activations,
        logits,
        OVERHEAD_BYTES,
        total,
        fits,
        0,
    )


def usable_bytes(gpu: Gpu) -> int:
    return int(gpu.memory_gb * GIB * USABLE_FRACTION)


def _micro_candidates(spec: RunSpec, world: int) -> list[int]:
    """Micro-batches that split the global batch evenly over `world`, largest first."""
    per_rank = spec.global_batch_seqs // world
    return [mb for mb in range(per_rank, 0, -1) if per_rank % mb == 0]


def max_fitting_micro(spec: RunSpec, strategy: str, world: int, gpu: Gpu, upto: int | None = None) -> int:
    """Largest micro-batch (<= upto) that splits the global batch and fits; 0 when none does."""
    for mb in _micro_candidates(spec, world):
        if (upto is None or mb <= upto) and strategy_memory(spec, strategy, world, mb, gpu).fits:
            return mb
    return 0


def config_strategy(spec: RunSpec) -> str:
    return spec.train.parallel + ("+ckpt" if spec.train.activation_checkpointing == "full" else "")


# ---------------------------------------------------------------- prices


@lru_cache(maxsize=4)
def _read_prices(path: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the price table {path}: {e}") from None
    table = raw.get("prices") if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected a 'prices:' mapping of GPU -> cloud -> on_demand/spot")
    for gpu, clouds in table.items():
        if gpu not in CATALOG or not isinstance(clouds, dict):
            raise ConfigError(f"{path}: unknown GPU {gpu!r}; use the names in orchestrator/gpus.py")
        for cloud, row in clouds.items():
            ok = cloud in CLOUDS and isinstance(row, dict) and set(row) <= {"on_demand", "spot"}
            if not ok or not all(isinstance(v, (int, float)) and v > 0 for v in row.values()):
                raise ConfigError(f"{path}: {gpu}.{cloud} must be {{on_demand: USD, spot: USD}} (positive)")
    return raw


def load_prices(path: str | Path = PRICES_PATH) -> dict:
    """The shipped price table: {'as_of': str, 'prices': {gpu: {cloud: {'on_demand': x, 'spot': y}}}}."""
    return _read_prices(str(path))


@dataclass
class PriceQuote:
    price: float | None  # USD per GPU-hour; None when unknown
    source: str  # "--price", "prices.yaml runpod spot", ... or why there is none
    note: str | None = None  # e.g. spot asked but only an on-demand price is known


def lookup_price(
    gpu: Gpu,
    cloud: str | None,
    spot: bool,
    *,
    nodes: int = 1,
    price: float | None = None,
    prices: dict | None = None,
) -> PriceQuote:
    """USD per GPU-hour: `price` if given, else the table's price on `cloud` or, with no cloud, the
    cheapest cloud that could run the launch (the spot column when spot; on-demand, with a note, when the
    table has no spot price there)."""
    if price is not None:
        return PriceQuote(float(price), "--price")
    table = (prices or load_prices())["prices"].get(gpu.name, {})
    clouds = [c for c in viable_clouds(gpu, cloud, nodes, spot) if c in table]
    column = "spot" if spot else "on_demand"
    options = [(table[c][column], c, column) for c in clouds if column in table[c]]
    note = None
    if not options and spot:
        options = [(table[c]["on_demand"], c, "on_demand") for c in clouds if "on_demand" in table[c]]
        if options:
            where = cloud or "any cloud that could run it"
            note = f"no spot price for {gpu.name} on {where} in prices.yaml: costed at on-demand"
    if not options:
        where = f" on {cloud}" if cloud else ""
        return PriceQuote(None, f"no price for {gpu.name}{where}: pass --price")
    value, chosen, col = min(options)
    source = f"prices.yaml {chosen} {col.replace('_', '-')}" + ("" if cloud else " (cheapest)")
    return PriceQuote(float(value), source, note)


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    model: dict  # the model shape, as in config.yaml
    params: int
    flops_per_token: float
    gpu: str
    gpu_memory_gb: int
    peak_tflops: float
    gpus_per_node: int
    nodes: int
    world: int
    cloud: str | None
    spot: bool
    usable_fraction: float
    memory: dict[str, Memory]  # STRATEGIES -> per-GPU breakdown at `micro_batch` (the config's if none fits)
    strategy: str  # the one the config asks for
    fits: bool
    config_micro_batch: int
    micro_batch: int | None  # what it will use; None when nothing fits
    grad_accum: int | None
    global_batch_seqs: int
    mfu: float
    tokens_per_s: float
    token_budget: float
    tokens_per_param: float
    config_tokens: int  # train.steps x global_batch_tokens: what the config will actually train
    steps_for_budget: int
    hours: float
    price_per_gpu_hour: float | None
    price_source: str
    cost: float | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(
    spec: RunSpec,
    req: GpuRequest,
    nodes: int = 1,
    *,
    cloud: str | None = None,
    spot: bool = False,
    mfu: float = 0.40,
    price: float | None = None,
    tokens: float | None = None,
    tokens_per_param: float = 20.0,
    prices: dict | None = None,
) -> Plan:
    """Memory, micro-batch, throughput, time and cost of `spec` on `req` x `nodes` (the primary GPU)."""
    check_combination(req, cloud, nodes, spot)
    cloud = cloud.strip().lower() if cloud else None
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} must be in (0, 1], e.g. 0.4")
    if price is not None and not (math.isfinite(price) and price >= 0):
        raise ConfigError(f"--price {price} must be a number of USD per GPU-hour >= 0")
    if tokens is not None and not (math.isfinite(tokens) and tokens > 0):
        raise ConfigError(f"--tokens {tokens} must be > 0")
    if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise ConfigError(f"--tokens-per-param {tokens_per_param}: tokens per parameter must be > 0")

    m, t, gpu = spec.model, spec.train, req.primary
    world = req.count * nodes
    seqs = spec.global_batch_seqs
    if seqs % world:
        raise ConfigError(
            f"the global batch of {seqs} sequences does not split over {world} GPUs ({req.count} per node x "
            f"--nodes {nodes}); choose "
            f"train.global_batch_tokens as a multiple of {world * m.seq_len}"
        )
    notes: list[str] = []
    strategy = config_strategy(spec)
    micro = max_fitting_micro(spec, strategy, world, gpu, upto=t.micro_batch_size)
    fits = micro > 0
    if fits and micro != t.micro_batch_size:
        why = "does not fit" if seqs % (world * t.micro_batch_size) == 0 else "does not split the batch"
        notes.append(
            f"train.micro_batch_size={t.micro_batch_size} {why} with {strategy} on {gpu.name}: "
            f"use train.micro_batch_size={micro}"
        )
    shown = micro or min(t.micro_batch_size, seqs // world)
    memory = {}
    for s in STRATEGIES:
        mem = strategy_memory(spec, s, world, shown, gpu)
        mem.max_micro_batch = max_fitting_micro(spec, s, world, gpu)
        memory[s] = mem
    if not fits:
        notes.append(_no_fit_advice(spec, strategy, world, gpu, memory))
    if t.parallel == "fsdp" and world == 1:
        notes.append("parallel=fsdp on one GPU neither shards nor autocasts (model/train.py): it runs fp32")

    fpt = flops_per_token(m)
    n = param_count(m)
    tok_s = mfu * gpu.peak_tflops * 1e12 * world / fpt
    budget = float(tokens) if tokens is not None else tokens_per_param * n
    hours = budget / tok_s / 3600
    config_tokens = t.steps * t.global_batch_tokens
    steps_for_budget = math.ceil(budget / t.global_batch_tokens)
    if steps_for_budget != t.steps:
        notes.append(
            f"the config trains {human(config_tokens)} tokens (train.steps={t.steps}); this budget of "
            f"{human(budget)} tokens is train.steps={steps_for_budget}"
        )
    quote = lookup_price(gpu, cloud, spot, nodes=nodes, price=price, prices=prices)
    if quote.note:
        notes.append(quote.note)
    cost = hours * world * quote.price if quote.price is not None else None
    return Plan(
        model=m.model_dump(mode="json"),
        params=n,
        flops_per_token=fpt,
        gpu=gpu.name,
        gpu_memory_gb=gpu.memory_gb,
        peak_tflops=gpu.peak_tflops,
        gpus_per_node=req.count,
        nodes=nodes,
        world=world,
        cloud=cloud,
        spot=spot,
        usable_fraction=USABLE_FRACTION,
        memory=memory,
        strategy=strategy,
        fits=fits,
        config_micro_batch=t.micro_batch_size,
        micro_batch=micro or None,
        grad_accum=seqs // (world * micro) if fits else None,
        global_batch_seqs=seqs,
        mfu=mfu,
        tokens_per_s=tok_s,
        token_budget=budget,
        tokens_per_param=budget / n,
        config_tokens=config_tokens,
        steps_for_budget=steps_for_budget,
        hours=hours,
        price_per_gpu_hour=quote.price,
        price_source=quote.source,
        cost=cost,
        notes=notes,
    )


def _no_fit_advice(spec: RunSpec, strategy: str, world: int, gpu: Gpu, memory: dict[str, Memory]) -> str:
    """One line: it does not fit; which strategy would, or which bigger GPUs would."""
    head = f"does not fit: {strategy} on {gpu.name} needs more than {usable_bytes(gpu) / GIB:.1f} GiB"
    head += " even at micro-batch 1" if 1 in _micro_candidates(spec, world) else ""
    settings = {
        "ddp": "train.parallel=ddp train.activation_checkpointing=none",
        "ddp+ckpt": "train.parallel=ddp train.activation_checkpointing=full",
        "fsdp": "train.parallel=fsdp train.activation_checkpointing=none",
        "fsdp+ckpt": "train.parallel=fsdp train.activation_checkpointing=full",
    }
    # On one GPU train.py runs fsdp unsharded and in fp32: never advise it there.
    useful = STRATEGIES if world > 1 else ("ddp", "ddp+ckpt")
    for s in useful:
        if memory[s].max_micro_batch:
            return f"{head}; {s} fits at micro-batch {memory[s].max_micro_batch} ({settings[s]})"
    bigger = [g.name for g in CATALOG.values() if any(max_fitting_micro(spec, s, world, g) for s in useful)]
    gpus = f"{world} GPU" + ("s" if world > 1 else "")
    if bigger:
        return f"{head}; nothing fits on {gpus} of this kind: use more GPUs or one of {', '.join(bigger)}"
    return f"{head}; nothing fits on {gpus} of any known kind: use more GPUs (--gpu NAME:8, --nodes)"


# ---------------------------------------------------------------- rendering


def human_time(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def plan_renderable(plan: Plan):
    """Rich tables: the summary, then memory per GPU for the four strategies."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    m = plan.model
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    shape = f"{m['n_layers']} layers, d_model {m['d_model']}, seq {m['seq_len']}, vocab {m['vocab_size']}"
    summary.add_row("model", f"{human(plan.params)} params ({shape})")
    summary.add_row("FLOPs/token", f"{plan.flops_per_token:.3g} (6N + attention)")
    where = plan.cloud or "any cloud"
    hw = f"{plan.gpu} x {plan.gpus_per_node}" + (f" x {plan.nodes} nodes" if plan.nodes > 1 else "")
    summary.add_row(
        "GPUs",
        f"{hw} = {plan.world} on {where}{', spot' if plan.spot else ''} "
        f"({plan.gpu_memory_gb} GB, {plan.peak_tflops:g} TFLOPS bf16 each)",
    )
    if plan.fits:
        batch = (
            f"{plan.strategy}, micro-batch {plan.micro_batch} x grad accum {plan.grad_accum} x "
            f"{plan.world} GPU{'s' if plan.world > 1 else ''} = {plan.global_batch_seqs} sequences"
        )
        summary.add_row("batch", batch)
    else:
        summary.add_row("batch", Text(f"{plan.strategy}: does not fit", style="bold red"))
    summary.add_row("throughput", f"{human(plan.tokens_per_s)} tokens/s at {plan.mfu:.0%} MFU")
    summary.add_row("budget", f"{human(plan.token_budget)} tokens ({plan.tokens_per_param:.1f} per param)")
    summary.add_row("time", human_time(plan.hours))
    if plan.cost is not None:
        summary.add_row(
            "cost",
            f"${plan.cost:,.0f} (${plan.price_per_gpu_hour:.2f}/GPU-hour, {plan.price_source}; "
            f"{plan.world} GPU{'s' if plan.world > 1 else ''} x {plan.hours:.1f} h)",
        )
    else:
        summary.add_row("cost", Text(plan.price_source, style="yellow"))

    mem = Table(
        title=f"memory per GPU in GiB at micro-batch {next(iter(plan.memory.values())).micro_batch} "
        f"(fits: <= {plan.usable_fraction:.0%} of {plan.gpu_memory_gb} GB)",
        title_justify="left",
        box=box.SIMPLE_HEAD,  # fits an 80-column terminal
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
    )
    mem.add_column("strategy", no_wrap=True)
    for col in ("weights", "grads", "optim", "activ", "logits", "other", "total"):
        mem.add_column(col, justify="right", min_width=len(col))
    mem.add_column("fits", min_width=4)
    mem.add_column("max mb", justify="right", min_width=6)
    for name, r in plan.memory.items():
        mark = Text("✓", style="green") if r.fits else Text("✗", style="red")
        label = f"{name} *" if name == plan.strategy else name
        mem.add_row(
            label,
            *(_gib(v) for v in (r.weights, r.gradients, r.optimizer, r.activations, r.logits, r.overhead)),
            Text(_gib(r.total), style="bold"),
            mark,
            str(r.max_micro_batch or "-"),
        )
    legend = "* the config's strategy; optim: AdamW state; activ: activations; other: CUDA context etc.; "
    legend += "max mb: the largest micro-batch that fits"
    parts = [summary, mem, Text(legend, style="dim")]
    parts += [Text(f"note: {n}", style="yellow") for n in plan.notes]
    return Group(*parts)
