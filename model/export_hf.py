"""Export a Decoder state_dict as a Hugging Face Llama checkpoint (no transformers import needed).

Our rotary convention is HF's, so the export is a rename plus splitting the fused q/k/v and
gate/up projections. The files are written into a temporary folder next to `out_dir` and renamed
into place at the end, so a failed export leaves nothing half-written.

An export removes or moves nothing it did not write: `out_dir` must be new, an empty folder, or (with
`force`) a previous export, which every export marks with `lmctl_export.json`. A file, or a folder of
anything else, is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.decoder import Decoder
from model.errors import ConfigError, make_parent_folder
from model.folders import clear_leftovers, move_into_place, new_sibling

EOT = "<|endoftext|>"
MARKER = "lmctl_export.json"  # in every export: what it holds, and the sign that it is ours to replace
MARKER_FORMAT = "lmctl-hf-export"
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DDP


def _strip_prefixes(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _check_matches(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """One clear line if the state_dict is not a Decoder of this config (wrong run or preset)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Decoder(cfg).state_dict().items()}
    if cfg.tie_embeddings and "lm_head.weight" not in sd:
        expected.pop("lm_head.weight")
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    wrong = [
        f"{k} {tuple(sd[k].shape)} (want {tuple(s)})"
        for k, s in expected.items()
        if k in sd and sd[k].shape != s
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"state_dict does not match the model config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )


def hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names and fused layouts -> HF LlamaForCausalLM names, contiguous CPU tensors."""
    sd = {_strip_prefixes(k): v for k, v in state_dict.items()}
    _check_matches(sd, cfg)
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[ours + "attn.qkv_proj.weight"].split((q_rows, kv_rows, kv_rows))
        gate, up = sd[ours + "mlp.gate_up_proj.weight"].chunk(2)
        out |= {
            hf + "self_attn.q_proj.weight": q,
            hf + "self_attn.k_proj.weight": k,
            hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": sd[ours + "attn.o_proj.weight"],
            hf + "mlp.gate_proj.weight": gate,
            hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": sd[ours + "mlp.down_proj.weight"],
            hf + "input_layernorm.weight": sd[ours + "attn_norm.weight"],
            hf + "post_attention_layernorm.weight": sd[ours + "mlp_norm.weight"],
        }
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig, dtype: torch.dtype, eot_id: int | None) -> dict:
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5 reads this, 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "use_cache": True,
        "torch_dtype": dtype_name,  # transformers < 5
        "dtype": dtype_name,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export_origin(out_dir: Path) -> dict | None:
    """The marker of the lmctl export at `out_dir` ({"run", "step", ...}), or None when it holds none."""
    try:
        marker = json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def _describe(origin: dict) -> str:
    known = [f"{k} {origin[k]}" for k in ("run", "step") if origin.get(k) is not None]
    return " ".join(known) or "a model"


def check_export_target(out_dir: str | Path, force: bool = False) -> Path:
    """`out_dir` resolved (a symlink is its target), if an export may go there: a new path, an empty folder,
    or with `force` a previous lmctl export. Anything else is refused with one ConfigError line, before
    anything is loaded or written."""
    out = Path(out_dir).expanduser().resolve()
    if not out.exists():
        return out
    if not out.is_dir():
        raise ConfigError(f"{str(out_dir)!r} is a file; choose a new folder for the export")
    origin = export_origin(out)
    if origin is not None:
        if not force:
            raise ConfigError(
                f"{str(out_dir)!r} holds an lmctl export of {_describe(origin)}: add --force to replace it"
            )
        return out
    try:
        empty = next(out.iterdir(), None) is None
    except OSError as e:
        raise ConfigError(f"cannot read {str(out_dir)!r}: {e.strerror or e}; choose a new folder") from None
    if not empty:
        raise ConfigError(f"{str(out_dir)!r} is not empty and holds no lmctl export; choose a new folder")
    return out


def export_hf(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: Path,
    tokenizer_json: Path | None = None,
    eot_id: int | None = None,
    *,
    force: bool = False,
    origin: dict | None = None,
) -> Path:
    """Write config.json, model.safetensors, generation_config.json (+ tokenizer files) and the marker
    lmctl_export.json (with `origin`: the run and step) to out_dir; a previous export is replaced only if
    `force`."""
    out = check_export_target(out_dir, force)
    tensors = hf_state_dict(state_dict, cfg)
    dtype = tensors["model.embed_tokens.weight"].dtype
    make_parent_folder(out)
    tmp = new_sibling(out, "tmp")
    try:
        tmp.mkdir()
    except OSError as e:
        raise ConfigError(
            f"cannot write into {out.parent}: {e.strerror or e}; choose another folder"
        ) from None
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config(cfg, dtype, eot_id))
        _write_json(tmp / "generation_config.json", {"bos_token_id": eot_id, "eos_token_id": eot_id})
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
            tok_cfg = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": EOT,
                "eos_token": EOT,
                "unk_token": EOT,
                "model_max_length": cfg.seq_len,
                "clean_up_tokenization_spaces": False,
            }
            _write_json(tmp / "tokenizer_config.json", tok_cfg)
        _write_json(tmp / MARKER, {"format": MARKER_FORMAT, **(origin or {})})
        move_into_place(tmp, out, fault="export.replace")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    clear_leftovers(out)
    return out
