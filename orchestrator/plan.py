"""`lmctl plan`: will this config fit on this GPU, how fast will it train, how long and at what cost.

Memory per GPU comes from model/memory.py (its docstring has the formula, fitted to what a step really holds);
with `train.activation_checkpointing: auto` (the bigger presets) the plan also chooses the checkpointing and
the micro-batch that train fastest on the chosen GPU, and a cloud launch writes that choice into the config.

Throughput: tokens/s = mfu x peak FLOP/s x W / flops_per_token; hours = token budget / tokens/s / 3600;
cost = hours x W x USD per GPU-hour. Interruptions (spot preemptions, on-demand failures), what they cost, and
the checkpoint interval chosen for them: orchestrator/preemption.py. Every figure is an estimate from
assumptions (MFU, the price table, the preemption table or the flags that replace them): `Plan.assumptions()`
names each, and the rendering says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from model.config import ModelConfig, RunSpec, flops_per_token, human, param_count
from model.errors import ConfigError
from model.hardware import DEFAULT_MFU
from model.memory import (
    GIB,
    STRATEGIES,
    USABLE_FRACTION,
    Memory,
    choose,
    max_fitting_micro,
    micro_candidates,
    parse_strategy,
    step_memory,
    strategy_name,
    usable_bytes,
)
from orchestrator import preemption
from orchestrator.gpus import CATALOG, CLOUDS, Gpu, GpuRequest, check_combination, viable_clouds
from orchestrator.preemption import Assumptions, Preemptions, Workload, money

PRICES_PATH = Path(__file__).resolve().parent.parent / "configs" / "pricing" / "prices.yaml"


def gpu_bytes(gpu: Gpu) -> int:
    return int(gpu.memory_gb * GIB)


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
            raise ConfigError(f"{path}: unknown GPU {gpu!r}; use the names in model/hardware.py")
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
    cloud: str | None = None  # the table's cloud the price is from; None for --price or no price


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
        return PriceQuote(float(price), "--price", cloud=cloud)
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
    return PriceQuote(float(value), source, note, chosen)


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
    strategy: str  # what the run will use: the config's, or the one `auto` chose
    checkpointing: str  # the activation checkpointing level of `strategy` (none, selective, full)
    auto: bool  # the config said activation_checkpointing=auto: the plan chose strategy and micro-batch
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
    # interruptions, what they cost and the checkpoint interval chosen for them (orchestrator/preemption.py)
    preemption: Preemptions | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "assumed": self.assumptions()}

    def assumptions(self) -> list[str]:
        """Each input the plan assumed, with where it comes from: no figure here was measured."""
        out = [f"{self.mfu:.0%} MFU (--mfu)"]
        if self.price_per_gpu_hour is not None:
            out.append(f"${self.price_per_gpu_hour:.2f} per GPU-hour ({self.price_source})")
        p = self.preemption
        if p is not None:
            out += p.assumed
            if p.versus and p.versus.on_demand_price is not None:
                out.append(
                    f"on-demand ${p.versus.on_demand_price:.2f} per GPU-hour ({p.versus.on_demand_source})"
                )
        return out

    def summary(self) -> dict:
        """What the plan expected, JSON-safe, for the run record (run.json's `plan`): all estimates."""
        p, cost = self.preemption, self.cost
        return {
            "gpu": self.gpu,
            "world": self.world,
            "cloud": self.cloud,
            "token_budget": self.token_budget,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "hours": self.hours,
            "cost": cost,
            "usd_per_btok": None if cost is None else cost / self.token_budget * 1e9,
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "price_source": self.price_source,
            "spot": self.spot,
            "mtbf_hours": p.mtbf_hours if p else None,
            "checkpoint_interval_s": p.interval_s if p else None,
            "checkpoint_every": p.checkpoint_every if p else None,
            "checkpoint_cost_s": p.checkpoint_cost_s if p else None,
            "expected_preemptions": p.expected if p else None,
            "expected_lost_hours": p.lost_hours if p else None,
            "expected_lost_cost": p.lost_cost if p else None,
            "recovery_s": p.recovery_s if p else None,
            "spot_verdict": p.versus.verdict if p and p.versus else None,
            "assumed": self.assumptions(),
        }


def tokens_per_s(model: ModelConfig, peak_flops: float, mfu: float = DEFAULT_MFU) -> float:
    """Training tokens/s of `model` on hardware of `peak_flops` FLOP/s in all, at `mfu` of that peak."""
    return mfu * peak_flops / flops_per_token(model)


def make_plan(
    spec: RunSpec,
    req: GpuRequest,
    nodes: int = 1,
    *,
    cloud: str | None = None,
    spot: bool = False,
    mfu: float = DEFAULT_MFU,
    price: float | None = None,
    tokens: float | None = None,
    tokens_per_param: float = 20.0,
    prices: dict | None = None,
    assume: Assumptions | None = None,
    preemption_table: dict | None = None,
) -> Plan:
    """Memory, micro-batch, throughput, time and cost of `spec` on `req` x `nodes` (the primary GPU), and its
    interruptions and checkpoint interval (`assume`: the flags that replace preemption.yaml's figures)."""
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
            f"--nodes {nodes}); choose train.global_batch_tokens as a multiple of {world * m.seq_len}"
        )
    notes: list[str] = []
    memory_bytes = gpu_bytes(gpu)
    auto = t.activation_checkpointing == "auto"
    chosen = choose(spec, world, memory_bytes)
    fits = chosen is not None
    level, micro = chosen if fits else ("none" if auto else t.activation_checkpointing, 0)
    strategy = strategy_name(t.parallel, level)
    if auto and fits:
        notes.append(
            f"activation_checkpointing=auto: {level} at micro-batch {micro} trains fastest on {gpu.name} "
            f"(set train.activation_checkpointing and train.micro_batch_size to choose yourself)"
        )
    elif fits and micro != t.micro_batch_size:
        why = "does not fit" if seqs % (world * t.micro_batch_size) == 0 else "does not split the batch"
        notes.append(
            f"train.micro_batch_size={t.micro_batch_size} {why} with {strategy} on {gpu.name}: "
            f"use train.micro_batch_size={micro}"
        )
    shown = micro or min(t.micro_batch_size, seqs // world)
    memory = {s: step_memory(spec, s, world, shown, memory_bytes) for s in STRATEGIES}
    for s, mem in memory.items():
        mem.max_micro_batch = max_fitting_micro(spec, s, world, memory_bytes)
    if not fits:
        notes.append(_no_fit_advice(spec, strategy, world, gpu, memory))

    n = param_count(m)
    tok_s = tokens_per_s(m, gpu.peak_tflops * 1e12 * world, mfu)
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
    work = Workload(n, m.vocab_size, budget, hours, t.global_batch_tokens / tok_s, nodes, world)
    where = _Where(gpu, cloud, nodes, prices, assume, preemption_table)
    interruptions = _interruptions(work, where, spot, quote)
    if not spot and assume is not None and assume.preemptions_per_hour is not None:
        notes.append("--preemptions-per-hour is a spot rate: add --spot (on demand, failures interrupt)")
    if warning := interruptions.warning():
        notes.append(warning)
    return Plan(
        model=m.model_dump(mode="json"),
        params=n,
        flops_per_token=flops_per_token(m),
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
        checkpointing=level,
        auto=auto,
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
        cost=hours * world * quote.price if quote.price is not None else None,
        notes=notes,
        preemption=interruptions,
    )


@dataclass(frozen=True)
class _Where:
    """Where a plan's run would go, for looking up its prices and interruption rates."""

    gpu: Gpu
    cloud: str | None
    nodes: int
    prices: dict | None
    assume: Assumptions | None
    table: dict | None

    def rates(self, spot: bool, quote: PriceQuote) -> preemption.Rates:
        candidates = viable_clouds(self.gpu, self.cloud, self.nodes, spot)
        return preemption.rates(spot, quote.cloud or self.cloud, candidates, self.assume, self.table)


def _interruptions(work: Workload, where: _Where, spot: bool, quote: PriceQuote) -> Preemptions:
    """The run's interruptions at its price; on spot, against the same run on demand."""
    estimate = preemption.estimate(work, where.rates(spot, quote), quote.price)
    if spot:
        od = lookup_price(where.gpu, where.cloud, False, nodes=where.nodes, prices=where.prices)
        on_demand = preemption.estimate(work, where.rates(False, od), od.price)
        estimate.versus = preemption.spot_or_not(work, estimate, quote.price, on_demand, od.price, od.source)
    return estimate


def _no_fit_advice(spec: RunSpec, strategy: str, world: int, gpu: Gpu, memory: dict[str, Memory]) -> str:
    """One line: it does not fit; which strategy would, or which bigger GPUs would."""
    head = f"does not fit: {strategy} on {gpu.name} needs more than {_gib(usable_bytes(gpu_bytes(gpu)))} GiB"
    head += " even at micro-batch 1" if 1 in micro_candidates(spec, world) else ""
    # On one GPU train.py does not shard: fsdp there is ddp's memory, never advise it.
    useful = STRATEGIES if world > 1 else tuple(s for s in STRATEGIES if s.startswith("ddp"))
    for s in useful:
        if memory[s].max_micro_batch:
            parallel, level = parse_strategy(s)
            settings = f"train.parallel={parallel} train.activation_checkpointing={level}"
            return f"{head}; {s} fits at micro-batch {memory[s].max_micro_batch} ({settings})"
    bigger = [
        g.name
        for g in CATALOG.values()
        if any(max_fitting_micro(spec, s, world, gpu_bytes(g)) for s in useful)
    ]
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


def _figure(x: float) -> str:
    """A whole number from 100 up (6,250), else 3 significant digits (0.0125, 10)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _seconds(s: float) -> str:
    return human_time(s / 3600) if s >= 3600 else f"{s / 60:.0f} min" if s >= 120 else f"{s:.0f} s"


def _interruption_rows(plan: Plan, p: Preemptions) -> list[tuple[str, str]]:
    """The checkpoint interval's arithmetic, the interruptions and what they cost, spot against on-demand,
    and what all of it assumed."""
    rows = [
        ("checkpoints", _checkpoint_text(p)),
        ("preemptions" if p.spot else "failures", _loss_text(plan, p)),
    ]
    if p.versus is not None:
        rows.append(("spot?", _versus_text(p.versus)))
    return [*rows, ("assumed", "; ".join(plan.assumptions()))]


def _checkpoint_text(p: Preemptions) -> str:
    per_param = preemption.STATE_BYTES_PER_PARAM
    return (
        f"every {p.checkpoint_every:,} steps of {p.step_s:.3g} s: {p.interval_explain}; one checkpoint is "
        f"{p.state_bytes / 1e9:.3g} GB ({per_param} bytes/param) at an assumed {p.store_mb_per_s:g} MB/s = "
        f"{p.checkpoint_cost_s:.3g} s, an estimate the run replaces with its first measured checkpoint"
    )


def _loss_text(plan: Plan, p: Preemptions) -> str:
    if p.spot:
        nodes = f"{plan.nodes} node{'s' if plan.nodes > 1 else ''}"
        mtbf = f"1 / ({nodes} x {p.per_node_hour:g} per node-hour)"
    else:
        mtbf = f"{p.mtbf_hours * plan.world:,.0f} GPU-hours / {plan.world} GPU{'s' if plan.world > 1 else ''}"
    start = "provision + setup" if p.provision_s is not None else "--recovery-minutes"
    lost = f"{p.lost_hours:.2g} h" + (f", {money(p.lost_cost)}" if p.lost_cost is not None else "")
    return (
        f"{p.expected:.2g} expected over {human_time(plan.hours)} (hours / MTBF, {_figure(p.mtbf_hours)} h = "
        f"{mtbf}; first order); each costs {_seconds(p.recovery_s)} to recover ({_seconds(p.start_s)} "
        f"{start}, {_seconds(p.fetch_s)} data fetch, {_seconds(p.load_s)} checkpoint load) + "
        f"{_seconds(p.redone_s)} redone on average: {lost} lost"
    )


def _versus_text(v: preemption.SpotOrNot) -> str:
    if v.spot_cost is None or v.on_demand_cost is None:
        return v.verdict
    return (
        f"spot {money(v.spot_cost)} with its lost hours, on-demand {money(v.on_demand_cost)} (assumed "
        f"${v.on_demand_price:.2f}/GPU-hour, {v.on_demand_source}; {v.on_demand_failures:.2g} failures lose "
        f"{v.on_demand_lost_hours:.2g} h): {v.verdict}"
    )


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
    summary.add_row("throughput", f"{human(plan.tokens_per_s)} tokens/s at an assumed {plan.mfu:.0%} MFU")
    summary.add_row("budget", f"{human(plan.token_budget)} tokens ({plan.tokens_per_param:.1f} per param)")
    summary.add_row("time", human_time(plan.hours))
    if plan.cost is not None:
        summary.add_row(
            "cost",
            f"${plan.cost:,.0f} (assumed ${plan.price_per_gpu_hour:.2f}/GPU-hour, {plan.price_source}; "
            f"{plan.world} GPU{'s' if plan.world > 1 else ''} x {plan.hours:.1f} h)",
        )
    else:
        summary.add_row("cost", Text(plan.price_source, style="yellow"))
    if plan.preemption is not None:
        for label, text in _interruption_rows(plan, plan.preemption):
            summary.add_row(label, text)

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
    for col in ("weights", "grads", "optim", "activ", "loss", "other", "total"):
        mem.add_column(col, justify="right", min_width=len(col))
    mem.add_column("fits", min_width=4)
    mem.add_column("max mb", justify="right", min_width=6)
    for name, r in plan.memory.items():
        mark = Text("✓", style="green") if r.fits else Text("✗", style="red")
        label = name.replace("selective", "sel") + (" *" if name == plan.strategy else "")
        mem.add_row(
            label,
            *(_gib(v) for v in (r.weights, r.gradients, r.optimizer, r.activations, r.loss, r.overhead)),
            Text(_gib(r.total), style="bold"),
            mark,
            str(r.max_micro_batch or "-"),
        )
    legend = "* the run's strategy" + (" (auto)" if plan.auto else "") + "; sel: selective checkpointing; "
    legend += "optim: AdamW state; activ: activations; other: CUDA context, workspaces; "
    legend += "max mb: the largest micro-batch that fits"
    parts = [summary, mem, Text(legend, style="dim")]
    parts += [Text(f"note: {n}", style="yellow") for n in plan.notes]
    return Group(*parts)
