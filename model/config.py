"""Run configuration: presets, dotted overrides, validation, and sizing arithmetic.

One validated `RunSpec` is the single source of truth a worker reads (`runs/<run>/config.yaml`).
This module imports no torch, so the CLI can resolve and print configs instantly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.errors import ConfigError, did_you_mean

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CORPUS = CONFIGS_DIR / "data" / "shakespeare.jsonl"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, data: Any) -> Any:
        """pydantic reads `train.steps=true` as 1; a yes/no where a number belongs is a mistake."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and field.annotation in (int, float):
                    raise ValueError(f"{name} must be a number, not {data[name]!r}")
        return data


class ModelConfig(_Strict):
    """Llama-style decoder shape."""

    vocab_size: int = Field(gt=0, le=1 << 20)
    d_model: int = Field(gt=0, le=1 << 16)
    n_layers: int = Field(gt=0, le=1024)
    n_heads: int = Field(gt=0, le=1024)
    n_kv_heads: int = Field(gt=0, le=1024)
    d_ff: int = Field(gt=0, le=1 << 18, description="SwiGLU hidden width")
    seq_len: int = Field(gt=1, le=1 << 20, description="context length trained on")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0, lt=1)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = d_model / n_heads = {self.head_dim} must be even (rotary embeddings)"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


CHECKPOINT_LEVELS = ("none", "selective", "full")  # model/decoder.py: selective is every other block


class TrainConfig(_Strict):
    """Optimisation, schedule, evaluation and checkpoint cadence."""

    steps: int = Field(gt=0, le=10**9)
    global_batch_tokens: int = Field(gt=0, le=1 << 30, description="tokens per optimizer step, all ranks")
    micro_batch_size: int = Field(gt=0, le=4096, description="sequences per forward pass per rank")
    lr: float = Field(gt=0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of lr")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "wsd"] = Field(
        "wsd",
        description="wsd (warmup, stable, decay): the default, because `lmctl resume --steps` can extend it; "
        "cosine's rate at every step depends on train.steps",
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of steps spent decaying")
    weight_decay: float = Field(0.1, ge=0, le=10)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    seed: int = Field(1337, ge=0, lt=2**63)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, gt=0)
    eval_batches: int = Field(8, gt=0, le=100000)
    evals: list[str] = Field(
        [],
        description="multiple-choice tasks scored at evaluations (model/evals.py): hellaswag, arc_easy, "
        "arc_challenge, piqa, a shipped one (configs/evals), or a .jsonl of {context, choices, label}",
    )
    evals_every: int | None = Field(None, gt=0, description="steps between task evals (default eval_every)")
    eval_examples: int = Field(500, gt=0, le=10**6, description="examples per task at most")
    samples: list[str] = Field([], description="prompts continued greedily at evaluations (log, metrics)")
    sample_tokens: int = Field(32, gt=0, le=1024, description="new tokens per sample")
    checkpoint_every: int | Literal["auto"] = Field(
        100,
        description="steps between checkpoints, or auto: Young/Daly's interval sqrt(2 C M) from the "
        "checkpoint's measured cost C and train.mtbf_hours M (model/checkpoint_interval.py); a cloud launch "
        "chooses auto unless told a number",
    )
    mtbf_hours: float | None = Field(
        None,
        gt=0,
        description="checkpoint_every=auto: the run's expected hours between interruptions, all nodes "
        "together (lmctl launch sets it from configs/pricing/preemption.yaml)",
    )
    checkpoint_cost_s: float | None = Field(
        None,
        ge=0,
        description="checkpoint_every=auto: the seconds a checkpoint is expected to take until the run has "
        "measured its first (lmctl launch sets it from the state's size and the store's assumed bandwidth)",
    )
    keep_checkpoints: int = Field(3, gt=0, le=1000)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA")
    compile: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: Literal["auto", "none", "selective", "full"] = Field(
        "auto",
        description="recompute in backward: none, selective (every other block), full (every block), or "
        "auto: on a GPU, the level and micro_batch_size that fit and train fastest (model/memory.py); "
        "none on a CPU",
    )
    async_checkpoint: bool = Field(True, description="write checkpoints in a background thread")
    init_from: str | None = Field(
        None,
        description="first weights of a new run (model/init_from.py): <checkpoints>@<step> of another run, "
        "or hf:<folder or hub id>; lmctl launch --init-from sets it",
    )

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _steps_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"{value!r}: give a number of steps > 0, or auto")

    @model_validator(mode="after")
    def _auto_interval_needs_a_rate(self) -> TrainConfig:
        if self.checkpoint_every == "auto" and self.mtbf_hours is None:
            raise ValueError(
                "train.checkpoint_every=auto needs train.mtbf_hours, the run's hours between interruptions "
                "(a cloud launch sets it from configs/pricing/preemption.yaml); or give a number of steps"
            )
        return self

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_yes_no(cls, value: Any) -> Any:
        """Earlier configs said true/false: true is full, false is none."""
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value


class SourceConfig(_Strict):
    """One dataset of a mixture: staged as data.dataset would be (data's other fields apply), drawn in
    proportion to its weight; `path` is its staged copy."""

    dataset: str = Field(min_length=1, description="hub id, file or folder")
    weight: float = Field(1.0, gt=0, description="relative share of the samples (normalised over sources)")
    subset: str | None = Field(None, min_length=1, description="hub config name (default: data.subset)")
    revision: str | None = Field(None, min_length=1, description="hub branch, tag or commit (default: main)")
    path: str | None = Field(None, description="staged dataset (folder or URI with manifest.json)")


class DataConfig(_Strict):
    """Where training text comes from and how it is split; `path` is the staged copy. With a `mixture`,
    its sources are staged one by one with one tokenizer (the first source's) and drawn at batch time;
    `dataset` is then unused and `path` is the first source's staged copy."""

    dataset: str = Field(str(DEFAULT_CORPUS), min_length=1, description="hub id, file or folder")
    subset: str | None = Field(None, min_length=1, description="hub config name, e.g. sample-10BT")
    split: str = Field("train", min_length=1)
    revision: str | None = Field(None, min_length=1, description="hub branch, tag or commit")
    text_field: str = Field("text", min_length=1)
    tokenizer: str = Field("train", min_length=1, description="'train' or a path to tokenizer.json")
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    shard_tokens: int = Field(1 << 24, gt=1024, le=1 << 32)
    max_tokens: int | None = Field(None, gt=0)
    path: str | None = Field(None, description="staged dataset (folder or URI with manifest.json)")
    mixture: list[SourceConfig] = Field(
        [], description="two or more datasets drawn by weight (model/data.py)"
    )

    @field_validator("mixture")
    @classmethod
    def _two_or_more(cls, value: list[SourceConfig]) -> list[SourceConfig]:
        if len(value) == 1:
            raise ValueError("a mixture needs two or more datasets; give one as data.dataset")
        return value

    @field_validator("dataset", "subset", "split", "revision", "text_field", "tokenizer")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value


class WandbConfig(_Strict):
    enabled: bool = False
    project: str = Field("lmctl", min_length=1)
    entity: str | None = None
    mode: Literal["auto", "online", "offline"] = Field("auto", description="auto: offline without a key")


class RunSpec(_Strict):
    """Everything a worker needs to train, resolved and validated."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig = DataConfig()
    wandb: WandbConfig = WandbConfig()

    @model_validator(mode="after")
    def _batch_divides(self) -> RunSpec:
        t, m = self.train, self.model
        per_micro = m.seq_len * t.micro_batch_size
        if t.global_batch_tokens % per_micro:
            raise ValueError(
                f"train.global_batch_tokens ({t.global_batch_tokens}) must be a multiple of "
                f"model.seq_len x train.micro_batch_size = {per_micro}"
            )
        return self

    @property
    def global_batch_seqs(self) -> int:
        return self.train.global_batch_tokens // self.model.seq_len

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each rank; raises ConfigError if the batch does not split."""
        seqs = self.global_batch_seqs
        if seqs % (world_size * self.train.micro_batch_size):
            raise ConfigError(
                f"global batch of {seqs} sequences does not split over {world_size} workers x "
                f"micro_batch_size {self.train.micro_batch_size}; choose train.global_batch_tokens "
                f"as a multiple of {world_size * self.train.micro_batch_size * self.model.seq_len}"
            )
        return seqs // (world_size * self.train.micro_batch_size)

    def with_train(self, **changes: Any) -> RunSpec:
        """This spec with train.* changed, validated as a whole (the batch must still split)."""
        return validate({**self.model_dump(), "train": {**self.train.model_dump(), **changes}})

    def to_yaml(self) -> str:
        """config.yaml's text: the whole resolved spec, the single source of truth every worker reads."""
        return "# resolved by lmctl; workers read this file. No secrets.\n" + yaml.safe_dump(
            self.model_dump(mode="json"), sort_keys=False
        )

    def write(self, run_dir: str | Path) -> None:
        """The one writer of a run's config.yaml, by a rename: a crash leaves the old file or the new one."""
        from model.shards import atomic_write  # a unique temporary name: every rank of a torchrun writes it

        atomic_write(Path(run_dir) / "config.yaml", [self.to_yaml().encode()])


# ---------------------------------------------------------------- presets and overrides


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Raw dict of a preset: a name from configs/ or a path to a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and _is_file(path)):
        path = CONFIGS_DIR / f"{name_or_path}.yaml"
        if not _is_file(path) or "/" in name_or_path or "\\" in name_or_path:
            raise ConfigError(
                f"unknown preset {name_or_path!r}: use one of {', '.join(preset_names())} or a .yaml path"
            )
    raw = _read_yaml(path, "preset")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(RunSpec.model_fields)}")
    return raw


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name longer than the filesystem allows
        return False


def _read_yaml(path: Path, what: str) -> Any:
    """The parsed file; any failure is one ConfigError line naming the file."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read {what} {path}: not valid YAML ({_yaml_problem(e)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None
    except (ValueError, TypeError, OverflowError) as e:  # a tag PyYAML cannot build: '!!int x'
        raise ConfigError(f"cannot read {what} {path}: not valid YAML ({e})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong, and where."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def all_keys(model: type[BaseModel] = RunSpec, prefix: str = "") -> list[str]:
    """Every dotted key an override may set: lists of text too (train.evals=[a,b]); data.mixture, a list of
    sources, is set by --dataset or a config file."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if get_origin(ann) is list:
            if get_args(ann)[0] is str:
                keys.append(prefix + name)
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += all_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', '3e-4' parsed as YAML); unknown keys rejected with suggestions."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.steps=1000")
    key, _, value = text.partition("=")
    key = key.strip()
    known = all_keys()
    if key == "data.mixture":
        raise ConfigError(
            "data.mixture is a list: give --dataset NAME:WEIGHT twice or more, or set it in a YAML config"
        )
    if key not in known:
        hint = did_you_mean(key, known) or f"known keys: {', '.join(known)}"
        raise ConfigError(f"unknown override key {key!r}; {hint}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else value
    except (yaml.YAMLError, ValueError, TypeError, OverflowError):  # ValueError: '!!int x'
        parsed = value
    section, _, name = key.partition(".")
    annotation = RunSpec.model_fields[section].annotation.model_fields[name].annotation
    if get_origin(annotation) is list:  # a list of text: [a, b], one item, or nothing
        items = parsed if isinstance(parsed, list) else [] if parsed in (None, "") else [value.strip()]
        return key, [str(i) for i in items]
    if isinstance(parsed, (dict, list)):
        parsed = value  # a scalar field never takes a structure; let validation name the type
    text_field = annotation in (str, str | None)
    if text_field and parsed is not None and not isinstance(parsed, str):
        parsed = value.strip()  # data.revision=2024: YAML reads a number, the field wants text
    return key, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        key, value = parse_override(text)
        section, _, field = key.partition(".")
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][field] = value
    return out


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) if str(p).isprintable() else repr(str(p)) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = e["loc"][0] if len(e["loc"]) > 1 else None
            known = [k for k in all_keys() if section is None or k.startswith(f"{section}.")]
            msg = f"unknown key; allowed: {', '.join(known)}"
        elif "input" in e and not isinstance(e["input"], dict) and e["type"] != "missing":
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(parts)


def validate(raw: dict[str, Any]) -> RunSpec:
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def resolve(preset: str, overrides: list[str] | None = None) -> RunSpec:
    """Preset name or path + ['key=value', ...] -> validated RunSpec."""
    return validate(apply_overrides(load_preset(preset), overrides or []))


def load_spec(path: str | Path) -> RunSpec:
    """Read a resolved config.yaml (what workers do)."""
    path = Path(path)
    raw = _read_yaml(path, "config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return validate(raw)


# ---------------------------------------------------------------- sizing arithmetic (no torch)


def layer_matmul_params(m: ModelConfig) -> int:
    """Matmul weights of one block: attention's q, k, v, o and the SwiGLU's gate, up, down."""
    kv = m.n_kv_heads * m.head_dim
    attn = 2 * m.d_model * m.d_model + 2 * m.d_model * kv  # wq, wo, wk, wv
    return attn + 3 * m.d_model * m.d_ff  # + SwiGLU gate, up, down


def param_count(m: ModelConfig) -> int:
    """Exact number of parameters of model.decoder.Decoder built from `m`."""
    embed = m.vocab_size * m.d_model
    head = 0 if m.tie_embeddings else embed
    norms = (2 * m.n_layers + 1) * m.d_model
    return embed + head + norms + m.n_layers * layer_matmul_params(m)


def matmul_params(m: ModelConfig) -> int:
    """Parameters used in a matmul per token: the layers plus the output projection.

    The input embedding is a lookup, not a matmul; the output projection counts even when it is
    tied to the embedding, because it is a real matmul every token.
    """
    return m.n_layers * layer_matmul_params(m) + m.vocab_size * m.d_model


def flops_per_token(m: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM appendix B), N = matmul_params."""
    t = seq_len or m.seq_len
    return 6 * matmul_params(m) + 12 * m.n_layers * m.n_heads * m.head_dim * t


def human(n: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}" if math.isfinite(n) else str(n)
