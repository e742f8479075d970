"""Import a Hugging Face Llama checkpoint folder into our Decoder, to continue pretraining it.

The inverse of model/export_hf.py: our rotary convention is HF's (rotate_half), so q/k need no permutation;
import is a rename plus stacking q/k/v and gate/up into the fused projections. Only what the Decoder computes
exactly is accepted: every config field that would change the function (scaled RoPE, biases, another
activation, a head_dim of its own, ...) is refused in one ConfigError line, so an import never trains a
silently different model. Weights are read from safetensors only (a pickle can run code), one tensor at a
time straight into the model's parameters, as fp32. No transformers import: it is a dev dependency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open

from model.config import ModelConfig
from model.decoder import Decoder
from model.errors import ConfigError
from model.tokenizer import EOT_NAMES, Tokenizer

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
ARCHITECTURE = "LlamaForCausalLM"
# HF name -> our ModelConfig field, with LlamaConfig's default where a config.json may leave it out (None:
# required, since LlamaConfig's defaults there are the 7B shape, never what a small checkpoint meant).
FIELDS = {
    "vocab_size": ("vocab_size", None),
    "hidden_size": ("d_model", None),
    "num_hidden_layers": ("n_layers", None),
    "num_attention_heads": ("n_heads", None),
    "intermediate_size": ("d_ff", None),
    "max_position_embeddings": ("seq_len", 2048),
    "rms_norm_eps": ("norm_eps", 1e-6),
    "tie_word_embeddings": ("tie_embeddings", False),
    "initializer_range": ("init_std", 0.02),
}
HF_NAME = {ours: hf for hf, (ours, _) in FIELDS.items()} | {
    "n_kv_heads": "num_key_value_heads",
    "rope_theta": "rope_theta",
}
SILU = ("silu", "swish")  # transformers maps both to SiLU
ROPE_KEYS = {"rope_type", "type", "rope_theta"}  # rope_parameters (transformers 5) / rope_scaling (4.x)


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path.parent} has no {path.name}: give a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}; it must be the {what} as JSON") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} must hold a JSON object ({what})")
    return obj


def _refuse(field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config.json: {field} is {value!r}; our decoder supports only {allowed}")


def _int(raw: dict, field: str, default: Any = None) -> int:
    value = raw.get(field)
    value = default if value is None else value
    if value is None:
        raise ConfigError(f"config.json has no {field}: it must be a whole number")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json: {field} is {value!r}; it must be a whole number")
    return value


def _rope_theta(raw: dict) -> float:
    """Theta of plain RoPE from rope_parameters, rope_scaling and/or rope_theta; any scaling is refused."""
    thetas = {}
    if raw.get("rope_theta") is not None:
        thetas["rope_theta"] = raw["rope_theta"]
    for name in ("rope_parameters", "rope_scaling"):
        params = raw.get(name)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise _refuse(name, params, "null or {'rope_type': 'default', 'rope_theta': ...}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise _refuse(f"{name}.rope_type", kind, "'default' (unscaled RoPE)")
        extra = sorted(params.keys() - ROPE_KEYS)
        if extra:
            raise _refuse(
                f"{name}.{extra[0]}", params[extra[0]], "unscaled RoPE (rope_type and rope_theta alone)"
            )
        if params.get("rope_theta") is not None:
            thetas[f"{name}.rope_theta"] = params["rope_theta"]
    for field, theta in thetas.items():
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise ConfigError(f"config.json: {field} is {theta!r}; it must be a number")
    if len(set(thetas.values())) > 1:
        raise ConfigError(f"config.json gives different RoPE thetas: {thetas}; make them agree")
    return float(next(iter(thetas.values()), 10000.0))


def read_hf_config(folder: str | Path) -> ModelConfig:
    """Our ModelConfig of folder/config.json; a ConfigError naming the field for anything the Decoder cannot
    compute exactly as LlamaForCausalLM would."""
    raw = _read_json(Path(folder) / "config.json", "model config")
    if raw.get("model_type") != "llama":
        raise _refuse("model_type", raw.get("model_type"), "'llama'")
    if raw.get("architectures") not in (None, [ARCHITECTURE]):
        raise _refuse("architectures", raw["architectures"], f"[{ARCHITECTURE!r}]")
    if raw.get("hidden_act", "silu") not in SILU:
        raise _refuse("hidden_act", raw["hidden_act"], "'silu'")
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field, False) is not False:
            raise _refuse(field, raw[field], "false (bias-free projections)")
    if raw.get("attention_dropout") not in (None, 0, 0.0):
        raise _refuse("attention_dropout", raw["attention_dropout"], "0 (no dropout)")
    if raw.get("quantization_config") is not None:
        raise _refuse("quantization_config", raw["quantization_config"], "none (unquantized weights)")

    hidden, heads = _int(raw, "hidden_size"), _int(raw, "num_attention_heads")
    kv_heads = _int(raw, "num_key_value_heads", heads)
    if heads < 1 or hidden % heads:
        raise _refuse("num_attention_heads", heads, f"a divisor of hidden_size ({hidden})")
    if kv_heads < 1 or heads % kv_heads:
        raise _refuse("num_key_value_heads", kv_heads, f"a divisor of num_attention_heads ({heads})")
    head_dim = _int(raw, "head_dim", hidden // heads)
    if head_dim != hidden // heads:
        raise _refuse("head_dim", head_dim, f"hidden_size / num_attention_heads ({hidden // heads})")
    if head_dim % 2:
        raise _refuse("head_dim", head_dim, "an even hidden_size / num_attention_heads (rotary embeddings)")

    values: dict[str, Any] = {"n_kv_heads": kv_heads, "rope_theta": _rope_theta(raw)}
    for hf, (ours, default) in FIELDS.items():
        values[ours] = _int(raw, hf) if default is None else raw.get(hf)
        values[ours] = default if values[ours] is None else values[ours]
    try:
        return ModelConfig(**values)
    except ValidationError as e:  # a value out of ModelConfig's range, named as config.json names it
        err = e.errors()[0]
        ours = str(err["loc"][0]) if err["loc"] else ""
        hf = HF_NAME.get(ours, "config")
        shown = f" is {values[ours]!r}" if ours in values else ""
        raise ConfigError(f"config.json: {hf}{shown}: {err['msg'].removeprefix('Value error, ')}") from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it (one file, or the shards of an index)."""
    if (folder / SINGLE).is_file():
        with safe_open(folder / SINGLE, "pt") as f:
            return dict.fromkeys(f.keys(), folder / SINGLE)
    if (folder / INDEX).is_file():
        weight_map = _read_json(folder / INDEX, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{folder / INDEX} has no weight_map of tensor names to shard files")
        files = {name: folder / str(shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ConfigError(f"{folder / INDEX} names the shard {shard.name}, which is not in {folder}")
        return files
    pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if pickles:
        raise ConfigError(
            f"{folder} holds {pickles[0]} but no {SINGLE}: only safetensors weights are read (a pickle can "
            "run code); convert it with transformers' save_pretrained(safe_serialization=True)"
        )
    raise ConfigError(f"{folder} has neither {SINGLE} nor {INDEX}: give a Hugging Face model folder")


def _slots(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF tensor name -> (our parameter, first row, end row): q/k/v and gate/up are row blocks of fused
    weights, everything else a whole parameter."""
    d, ff, q, kv = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {
        "model.embed_tokens.weight": ("tok_embeddings.weight", 0, cfg.vocab_size),
        "model.norm.weight": ("norm.weight", 0, d),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", 0, cfg.vocab_size)
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        qkv, gate_up = ours + "attn.qkv_proj.weight", ours + "mlp.gate_up_proj.weight"
        out |= {
            hf + "self_attn.q_proj.weight": (qkv, 0, q),
            hf + "self_attn.k_proj.weight": (qkv, q, q + kv),
            hf + "self_attn.v_proj.weight": (qkv, q + kv, q + 2 * kv),
            hf + "self_attn.o_proj.weight": (ours + "attn.o_proj.weight", 0, d),
            hf + "mlp.gate_proj.weight": (gate_up, 0, ff),
            hf + "mlp.up_proj.weight": (gate_up, ff, 2 * ff),
            hf + "mlp.down_proj.weight": (ours + "mlp.down_proj.weight", 0, d),
            hf + "input_layernorm.weight": (ours + "attn_norm.weight", 0, d),
            hf + "post_attention_layernorm.weight": (ours + "mlp_norm.weight", 0, d),
        }
    return out


def _checked_names(files: dict[str, Path], slots: dict[str, tuple[str, int, int]]) -> list[str]:
    """Names that are no parameter but are checked (a tied lm_head saved anyway, old rotary inv_freq
    buffers); any other name left over, or a parameter absent, is a ConfigError before anything is copied."""
    extra = [n for n in files if n not in slots]
    checked = [n for n in extra if n == "lm_head.weight" or n.endswith(".rotary_emb.inv_freq")]
    missing, unknown = sorted(slots.keys() - files.keys()), sorted(set(extra) - set(checked))
    if missing or unknown:
        raise ConfigError(
            f"the checkpoint's tensors are not a Llama of its config.json: missing {missing[:3]}, "
            f"unexpected {unknown[:3]} ({len(missing)} and {len(unknown)} in all)"
        )
    return checked


def _float32(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise ConfigError(f"tensor {name} is {tensor.dtype}; only floating-point weights can be imported")
    return tensor.to(torch.float32)


@torch.no_grad()
def load_hf_weights(folder: str | Path, model: Decoder) -> None:
    """Copy the checkpoint's tensors into `model`, each cast to fp32, one at a time (no second copy of the
    model in memory). Strict: a tensor missing or left over is refused before any copy, a wrong shape at
    it."""
    folder = Path(folder)
    files, slots = _weight_files(folder), _slots(model.cfg)
    checked = _checked_names(files, slots)
    params = dict(model.named_parameters(remove_duplicate=False))
    by_file: dict[Path, list[str]] = {}
    for name in [*slots, *checked]:
        by_file.setdefault(files[name], []).append(name)
    later = {}  # checked once every parameter is in
    for path, names in by_file.items():
        with safe_open(path, "pt") as f:
            for name in names:
                tensor = _float32(name, f.get_tensor(name))
                if name in checked:
                    later[name] = tensor
                    continue
                ours, start, end = slots[name]
                target = params[ours][start:end]
                if tensor.shape != target.shape:
                    want = tuple(target.shape)
                    raise ConfigError(
                        f"tensor {name} has shape {tuple(tensor.shape)}; config.json implies {want}"
                    )
                target.copy_(tensor)
    _check_later(later, model)


def _check_later(tensors: dict[str, torch.Tensor], model: Decoder) -> None:
    """A tied lm_head saved anyway must equal the embedding; a saved inv_freq must be our RoPE's."""
    cfg = model.cfg
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    )
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and not torch.equal(tensor, model.tok_embeddings.weight.float().cpu()):
            raise ConfigError(
                "config.json: tie_word_embeddings is true but lm_head.weight differs from the embedding; "
                "only a tied head equal to it, or tie_word_embeddings false, is supported"
            )
        if name != "lm_head.weight" and not torch.allclose(tensor, inv_freq, rtol=1e-2):
            raise ConfigError(f"{name} is not the inverse frequencies of rope_theta {cfg.rope_theta}")


def load_hf_tokenizer(folder: str | Path) -> Tokenizer:
    """Our Tokenizer of folder/tokenizer.json (byte-level BPE only). Its end-of-text id is Tokenizer's rule
    (the first of EOT_NAMES it has, else the first special token), which staging puts between documents;
    one that config.json's eos_token_id does not name is refused rather than trained with the wrong
    separator."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        found = " (it has a SentencePiece tokenizer.model, which is not supported)"
        found = found if (folder / "tokenizer.model").is_file() else ""
        raise ConfigError(
            f"{folder} has no tokenizer.json{found}; only byte-level BPE tokenizer.json is read"
        )
    try:
        tok = Tokenizer.load(path)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    config = folder / "config.json"
    eos = _read_json(config, "model config").get("eos_token_id") if config.is_file() else None
    eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if eos_ids and tok.eot_id not in eos_ids:
        eot = tok.backend.id_to_token(tok.eot_id)
        raise ConfigError(
            f"config.json: eos_token_id is {eos!r} but tokenizer.json's end-of-text is {tok.eot_id} "
            f"({eot!r}); supported: an eos that is one of {', '.join(EOT_NAMES)}, or else the first "
            "special token"
        )
    return tok


def import_hf(folder: str | Path) -> tuple[ModelConfig, Decoder, Tokenizer]:
    """(config, fp32 Decoder on the CPU holding the checkpoint's weights, tokenizer) of an HF Llama folder;
    everything cheap is checked before the model is built."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{str(folder)!r} is not a folder: give a Hugging Face model folder")
    cfg = read_hf_config(folder)
    tok = load_hf_tokenizer(folder)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer.json has {tok.vocab_size} tokens but config.json's vocab_size is {cfg.vocab_size}; "
            "the model must have a row for every token"
        )
    _weight_files(folder)  # a folder without weights fails before the model is allocated
    model = Decoder(cfg)
    load_hf_weights(folder, model)
    return cfg, model, tok
