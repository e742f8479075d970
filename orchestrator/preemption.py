"""Interruptions before renting: how often a run is preempted or fails, what each costs, whether spot pays,
and the checkpoint interval chosen from them (`train.checkpoint_every: auto`). No torch.

Every rate, time and bandwidth here is an assumption, from configs/pricing/preemption.yaml (its sources and
date are in the file) or from a flag that replaces it; `Rates.assumed` says which, for the plan to show.
First order throughout:

  MTBF              spot: 1 / (nodes x preemptions per node-hour); on demand: failure GPU-hours / world GPUs
  C, a checkpoint   state bytes / store bandwidth; the state is 12 bytes a parameter (model/state.py: fp32
                    weights, AdamW's two fp32 moments); the run measures C on its first checkpoint
  interval          model/checkpoint_interval.choose(C, MTBF): Young/Daly's sqrt(2 C MTBF), bounded; in
                    steps of global_batch_tokens / planned tokens per second
  recovery          provision + setup (or --recovery-minutes) + data fetch (token budget x bytes per staged
                    token / bandwidth) + checkpoint load (state bytes / bandwidth)
  each interruption recovery + interval / 2 of work redone, on average
  expected count    hours / MTBF (first order: interruptions during the lost time itself are not counted)
  spot or not       (hours + lost hours) x GPUs x price, spot against on-demand (whose failures lose less)
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from model import checkpoint_interval
from model.config import ModelConfig, param_count
from model.errors import ConfigError
from orchestrator.gpus import CLOUDS

TABLE_PATH = Path(__file__).resolve().parent.parent / "configs" / "pricing" / "preemption.yaml"
TABLE = "preemption.yaml"
SPOT_CLOUDS = ("runpod", "aws", "gcp")  # the clouds of gpus.CLOUDS that sell spot capacity
STATE_BYTES_PER_PARAM = 12  # a checkpoint: fp32 weights (4) + AdamW's exp_avg and exp_avg_sq (4 + 4)
MB = 1e6
RATE, PROVISION = "spot_preemptions_per_node_hour", "provision_s"
TOP_KEYS = ("as_of", "sources", "setup_s", "store_mb_per_s", "failure_mtbf_gpu_hours", "clouds")


# ---------------------------------------------------------------- the table


@lru_cache(maxsize=4)
def _read_table(path: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read the preemption table {path}: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with the keys {', '.join(TOP_KEYS)}")
    _only_keys(path, "", raw, TOP_KEYS)
    if not (isinstance(raw.get("as_of"), (str, datetime.date)) and str(raw["as_of"]).strip()):
        raise ConfigError(f'{path}: as_of: give the date the figures were chosen, e.g. "2026-12"')
    sources = raw.get("sources")
    if not (isinstance(sources, list) and sources and all(isinstance(s, str) and s.strip() for s in sources)):
        raise ConfigError(f"{path}: sources: give a list of where the figures come from (text)")
    _number(path, "setup_s", raw.get("setup_s"), zero_ok=True)
    _number(path, "store_mb_per_s", raw.get("store_mb_per_s"))
    _number(path, "failure_mtbf_gpu_hours", raw.get("failure_mtbf_gpu_hours"))
    clouds = raw.get("clouds")
    if not isinstance(clouds, dict):
        raise ConfigError(f"{path}: clouds: expected a mapping of {', '.join(CLOUDS)} -> {{{PROVISION}: s}}")
    _only_keys(path, "clouds.", clouds, CLOUDS)
    for cloud in CLOUDS:
        _check_cloud(path, cloud, clouds.get(cloud))
    return raw


def _check_cloud(path: str, cloud: str, row) -> None:
    sells_spot = cloud in SPOT_CLOUDS
    shape = f"{{{RATE}: RATE, {PROVISION}: SECONDS}}" if sells_spot else f"{{{PROVISION}: SECONDS}} (no spot)"
    if not isinstance(row, dict):
        raise ConfigError(f"{path}: clouds.{cloud}: missing or not a mapping; give {shape}")
    _only_keys(path, f"clouds.{cloud}.", row, (RATE, PROVISION) if sells_spot else (PROVISION,))
    _number(path, f"clouds.{cloud}.{PROVISION}", row.get(PROVISION), zero_ok=True)
    if sells_spot:
        _number(path, f"clouds.{cloud}.{RATE}", row.get(RATE))


def _only_keys(path: str, prefix: str, mapping: dict, allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"{path}: {prefix}{key}: unknown key; allowed: {', '.join(allowed)}")


def _number(path: str, key: str, value, zero_ok: bool = False) -> None:
    if value is None:
        raise ConfigError(f"{path}: {key}: missing")
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and (value >= 0 if zero_ok else value > 0)):
        raise ConfigError(f"{path}: {key}: {value!r} must be a number {'>= 0' if zero_ok else '> 0'}")


def load_table(path: str | Path = TABLE_PATH) -> dict:
    """The shipped table, validated: as_of, sources, setup_s, store_mb_per_s, failure_mtbf_gpu_hours and
    clouds -> {provision_s, spot_preemptions_per_node_hour where spot is sold}. Do not change what it returns
    (it is cached)."""
    return _read_table(str(path))


# ---------------------------------------------------------------- the flags


@dataclass(frozen=True)
class Assumptions:
    """What the flags put in place of the table's figures; None keeps the table's. Given as numbers or as the
    text typed: either way a value out of range is one ConfigError line naming its flag."""

    preemptions_per_hour: float | None = None  # --preemptions-per-hour: spot preemptions per node-hour
    recovery_minutes: float | None = None  # --recovery-minutes: replaces provision + setup
    store_mbps: float | None = None  # --store-mbps: store bandwidth in MB/s

    def __post_init__(self) -> None:
        for name in FLAG_LIMITS:
            object.__setattr__(self, name, _flag_number(name, getattr(self, name)))


# Assumptions' fields: (lowest, highest, what the flag gives, an example); the bounds keep every figure finite
FLAG_LIMITS = {
    "preemptions_per_hour": (1e-6, 60.0, "spot preemptions per node-hour", "0.05"),
    "recovery_minutes": (0.0, 10080.0, "minutes to provision and set up a node (a week at most)", "15"),
    "store_mbps": (0.01, 1e6, "megabytes per second", "100"),
}


def _flag_number(name: str, value) -> float | None:
    """`value` (a number or the text typed) as a float within FLAG_LIMITS[name]; else one error line."""
    if value is None:
        return None
    low, high, what, example = FLAG_LIMITS[name]
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and low <= number <= high):
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} {value!r}: give {what} from {low:g} to {high:g}, e.g. {example}")
    return number


# ---------------------------------------------------------------- which figures an estimate assumes


@dataclass(frozen=True)
class Rates:
    """The assumed inputs of one estimate, and `assumed`: each said with where it comes from."""

    spot: bool
    cloud: str  # whose provisioning time (and spot rate) is assumed
    per_node_hour: float | None  # spot preemptions per node-hour; None on demand
    failure_gpu_hours: float  # on demand: GPU-hours between failures per GPU
    start_s: float  # provision + setup, or --recovery-minutes
    provision_s: float | None  # None where --recovery-minutes replaced provision + setup
    setup_s: float | None
    store_mb_per_s: float
    assumed: tuple[str, ...]


def rates(
    spot: bool, cloud: str | None, candidates: list[str], assume: Assumptions | None = None, table=None
) -> Rates:
    """The figures for a run on `cloud`; with none known (no cloud chosen, a --price given), the worst of the
    `candidates` that could run it: the highest spot rate, or the slowest provisioning."""
    table, assume = table or load_table(), assume or Assumptions()
    where = f"{TABLE} {cloud}"
    if cloud is None:
        cloud = _worst(table["clouds"], spot, candidates)
        where = f"{TABLE} {cloud}, the worst of the clouds that could run it"
    row = table["clouds"][cloud]
    per_node_hour, rate_text = _spot_rate(row, cloud, where, assume) if spot else (None, _failure_text(table))
    if spot and assume.preemptions_per_hour is None:  # the rate said where it is from: once is enough
        where = f"{TABLE} {cloud}"
    start, provision, setup, start_text = _start(row, table, where, assume)
    store, source = (
        (assume.store_mbps, "--store-mbps")
        if assume.store_mbps is not None
        else (table["store_mb_per_s"], TABLE)
    )
    return Rates(
        spot=spot,
        cloud=cloud,
        per_node_hour=per_node_hour,
        failure_gpu_hours=float(table["failure_mtbf_gpu_hours"]),
        start_s=start,
        provision_s=provision,
        setup_s=setup,
        store_mb_per_s=float(store),
        assumed=(rate_text, start_text, f"{store:g} MB/s to and from the store ({source})"),
    )


def _spot_rate(row: dict, cloud: str, where: str, assume: Assumptions) -> tuple[float, str]:
    if assume.preemptions_per_hour is not None:
        rate, source = assume.preemptions_per_hour, "--preemptions-per-hour"
    elif RATE in row:
        rate, source = float(row[RATE]), where
    else:
        raise ConfigError(f"{cloud} sells no spot capacity ({TABLE} has no {RATE} for it)")
    return rate, f"{rate:g} spot preemptions per node-hour ({source})"


def _failure_text(table: dict) -> str:
    return f"{table['failure_mtbf_gpu_hours']:,g} GPU-hours between failures per GPU ({TABLE}, after Llama 3)"


def _start(
    row: dict, table: dict, where: str, assume: Assumptions
) -> tuple[float, float | None, float | None, str]:
    """Seconds before a replacement node can load anything: (total, provision, setup, said how)."""
    if assume.recovery_minutes is not None:
        minutes = assume.recovery_minutes
        return (
            minutes * 60,
            None,
            None,
            f"{minutes:g} min to provision and set up a node (--recovery-minutes)",
        )
    provision, setup = float(row[PROVISION]), float(table["setup_s"])
    text = f"{provision:.0f} s to provision a node ({where}) + {setup:.0f} s of setup ({TABLE})"
    return provision + setup, provision, setup, text


def _worst(clouds: dict, spot: bool, candidates: list[str]) -> str:
    """Of the clouds that could run it, the one with the highest spot rate (spot) or slowest provisioning."""
    pool = [c for c in candidates if c in clouds and (not spot or RATE in clouds[c])]
    pool = pool or [c for c in CLOUDS if not spot or c in SPOT_CLOUDS]
    return max(pool, key=lambda c: (clouds[c].get(RATE, 0) if spot else 0, clouds[c][PROVISION]))


# ---------------------------------------------------------------- the arithmetic


def run_mtbf_hours(rates: Rates, nodes: int, world: int) -> float:
    """The run's mean hours between interruptions, all its nodes together."""
    if rates.spot:
        return 1.0 / (nodes * rates.per_node_hour)
    return rates.failure_gpu_hours / world


def state_bytes(params: int) -> int:
    """What one checkpoint writes (model/state.py: model.pt's fp32 weights and optim.pt's two moments)."""
    return STATE_BYTES_PER_PARAM * params


def transfer_s(nbytes: float, mb_per_s: float) -> float:
    return nbytes / (mb_per_s * MB)


def bytes_per_token(vocab_size: int) -> int:
    """What a staged token takes in a shard (model/shards.py: uint16 up to 65536 ids, else uint32)."""
    from model.shards import dtype_for_vocab

    return dtype_for_vocab(vocab_size).itemsize


def checkpoint_cost_s(model: ModelConfig, mb_per_s: float) -> float:
    """C before the run has measured one: the state's bytes over the store's bandwidth."""
    return transfer_s(state_bytes(param_count(model)), mb_per_s)


@dataclass(frozen=True)
class Workload:
    """What the plan knows of a run: its size, its time and its GPUs."""

    params: int
    vocab_size: int
    token_budget: float
    hours: float
    step_s: float  # one optimizer step: global_batch_tokens / planned tokens per second
    nodes: int
    world: int


@dataclass
class SpotOrNot:
    """Spot against on-demand for one run: (hours + lost hours) x GPUs x price, each."""

    spot_cost: float | None
    on_demand_cost: float | None
    on_demand_price: float | None  # USD per GPU-hour
    on_demand_source: str  # where that price comes from (prices.yaml ...), or why there is none
    on_demand_failures: float  # expected on-demand interruptions
    on_demand_lost_hours: float
    verdict: str


@dataclass
class Preemptions:
    """A run's expected interruptions, what each costs, and the checkpoint interval chosen for them."""

    spot: bool
    cloud: str  # whose figures are assumed
    per_node_hour: float | None
    mtbf_hours: float
    state_bytes: int
    store_mb_per_s: float
    checkpoint_cost_s: float  # C, estimated: state bytes / bandwidth
    young_daly_s: float
    interval_s: float  # what checkpoint_interval.choose chose
    interval_bound: str | None
    interval_explain: str
    step_s: float
    checkpoint_every: int  # the interval in steps
    start_s: float  # provision + setup (or --recovery-minutes)
    provision_s: float | None  # None where --recovery-minutes replaced provision + setup
    setup_s: float | None
    fetch_s: float  # the staged data again
    load_s: float  # the newest checkpoint
    recovery_s: float
    redone_s: float  # half an interval of work, on average
    expected: float  # interruptions over the run
    lost_hours: float
    lost_cost: float | None
    assumed: list[str]
    versus: SpotOrNot | None = None  # spot only

    def warning(self) -> str | None:
        """A rate so high that the run is interrupted more often than it takes to recover and checkpoint."""
        if self.mtbf_hours * 3600 > self.recovery_s + self.interval_s:
            return None
        return (
            f"at these rates the run is interrupted every {self.mtbf_hours * 60:.0f} min on average, less "
            f"than a recovery ({self.recovery_s / 60:.0f} min) and a checkpoint interval take: it may not end"
        )


def estimate(work: Workload, rates: Rates, price: float | None) -> Preemptions:
    """Expected interruptions of `work` at `rates`, the time and money they lose at `price` per GPU-hour."""
    mtbf_h = run_mtbf_hours(rates, work.nodes, work.world)
    state = state_bytes(work.params)
    cost_s = transfer_s(state, rates.store_mb_per_s)
    interval = checkpoint_interval.choose(cost_s, mtbf_h * 3600)
    fetch_s = transfer_s(work.token_budget * bytes_per_token(work.vocab_size), rates.store_mb_per_s)
    recovery_s = rates.start_s + fetch_s + cost_s  # loading a checkpoint moves what writing it did
    redone_s = interval.seconds / 2
    expected = work.hours / mtbf_h
    lost_hours = expected * (recovery_s + redone_s) / 3600
    return Preemptions(
        spot=rates.spot,
        cloud=rates.cloud,
        per_node_hour=rates.per_node_hour,
        mtbf_hours=mtbf_h,
        state_bytes=state,
        store_mb_per_s=rates.store_mb_per_s,
        checkpoint_cost_s=cost_s,
        young_daly_s=interval.young_daly_s,
        interval_s=interval.seconds,
        interval_bound=interval.bound,
        interval_explain=interval.explain(),
        step_s=work.step_s,
        checkpoint_every=interval.steps(work.step_s),
        start_s=rates.start_s,
        provision_s=rates.provision_s,
        setup_s=rates.setup_s,
        fetch_s=fetch_s,
        load_s=cost_s,
        recovery_s=recovery_s,
        redone_s=redone_s,
        expected=expected,
        lost_hours=lost_hours,
        lost_cost=None if price is None else lost_hours * work.world * price,
        assumed=list(rates.assumed),
    )


def total_cost(work: Workload, lost_hours: float, price: float | None) -> float | None:
    """What the run costs with its lost hours: (hours + lost) x GPUs x price."""
    return None if price is None else (work.hours + lost_hours) * work.world * price


def spot_or_not(
    work: Workload, spot: Preemptions, spot_price: float | None, on_demand: Preemptions, od_price, od_source
) -> SpotOrNot:
    """Spot's expected total cost against on-demand's, and the one-line verdict."""
    spot_cost = total_cost(work, spot.lost_hours, spot_price)
    od_cost = total_cost(work, on_demand.lost_hours, od_price)
    return SpotOrNot(
        spot_cost=spot_cost,
        on_demand_cost=od_cost,
        on_demand_price=od_price,
        on_demand_source=od_source,
        on_demand_failures=on_demand.expected,
        on_demand_lost_hours=on_demand.lost_hours,
        verdict=verdict(spot_cost, od_cost),
    )


def verdict(spot_cost: float | None, on_demand_cost: float | None) -> str:
    if spot_cost is None or on_demand_cost is None:
        return "no verdict on spot: a price is missing (pass --price, or see prices.yaml)"
    if spot_cost < on_demand_cost:
        saved = on_demand_cost - spot_cost
        return f"spot saves {money(saved)} ({saved / on_demand_cost:.0%}) for this run"
    return f"on-demand is cheaper for this run (spot costs {money(spot_cost - on_demand_cost)} more)"


def money(usd: float) -> str:
    if abs(usd) < 0.005:
        return "under $0.01"
    return f"${usd:,.0f}" if abs(usd) >= 100 else f"${usd:,.2f}"


# ---------------------------------------------------------------- a local run's auto interval


def local_auto(model: ModelConfig, devices: int, table=None) -> tuple[float, float]:
    """(mtbf_hours, checkpoint_cost_s) for a local run that asked for checkpoint_every=auto: on-demand
    failures of `devices` GPUs (a CPU counts as one), and the table's store bandwidth."""
    table = table or load_table()
    mtbf_hours = table["failure_mtbf_gpu_hours"] / max(1, devices)
    return float(mtbf_hours), checkpoint_cost_s(model, float(table["store_mb_per_s"]))
