"""Where a new run's first weights come from (train.init_from): continued pretraining.

    <checkpoints folder or store URI>@<step>    another lmctl run's committed checkpoint
    hf:<folder or hub id>                       a Hugging Face Llama checkpoint (model/import_hf.py)

`lmctl launch --init-from` resolves what the user names (a run, `run@step`, a folder, a hub id) into one of
these, with the model shape and tokenizer they imply (orchestrator/init_source.py); the workers read it here
when the run has no checkpoint of its own yet. From the first checkpoint on the run resumes from itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import ModelConfig
from model.errors import ConfigError

HF = "hf:"


def split_checkpoint(source: str) -> tuple[str, int]:
    """('<checkpoints>', step) of '<checkpoints>@<step>'."""
    where, _, step = source.rpartition("@")
    if not where or not step.isdigit():
        raise ConfigError(f"train.init_from {source!r}: give <checkpoints>@<step> or hf:<folder or hub id>")
    return where, int(step)


def hf_folder(source: str, weights: bool = True) -> Path:
    """The local folder of an hf: source: a folder as it is; a folder in a store (a cloud run's upload of a
    local one) fetched, verified, into the cache; a hub id downloaded into the hub's cache. Only config.json
    and the tokenizer files without `weights` (what staging and the shape need): no gigabytes for those."""
    name = source.removeprefix(HF)
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    patterns = ["config.json", "tokenizer*.json"]
    if weights:
        patterns += ["*.safetensors", "model.safetensors.index.json"]
    if "://" in name:
        import fnmatch
        import hashlib

        from model.store import cache_root, open_store

        store = open_store(name)
        local = cache_root() / "init" / hashlib.sha256(name.encode()).hexdigest()[:16]
        for key in store.list():
            if any(fnmatch.fnmatch(key, p) for p in patterns):
                store.get_file(key, local / key)
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:
        why = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"--init-from {name}: not a folder, and the hub has no model of that id: {why}"
        ) from None


def source_config(source: str) -> ModelConfig:
    """The model shape `source` holds: what the run must be built as."""
    if source.startswith(HF):
        from model.import_hf import read_hf_config

        return read_hf_config(hf_folder(source, weights=False))
    from model.checkpoint import Checkpointer

    where, step = split_checkpoint(source)
    loaded = Checkpointer(where).load(step, keys=[])
    if loaded is None:
        raise ConfigError(f"{where} has no committed checkpoint {step}")
    return ModelConfig.model_validate(loaded[1]["config"]["model"])


def initial_state(source: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The full model state dict of `source`, checked to be of shape `cfg` (seq_len may differ: RoPE has no
    learnt positions)."""
    have = source_config(source)
    differs = [
        f"{k} {getattr(have, k)} (run: {getattr(cfg, k)})"
        for k in ModelConfig.model_fields
        if k != "seq_len" and getattr(have, k) != getattr(cfg, k)
    ]
    if differs:
        raise ConfigError(f"train.init_from {source} holds another model shape: {', '.join(differs)}")
    if source.startswith(HF):
        from model.decoder import Decoder
        from model.import_hf import load_hf_weights

        model = Decoder(have)
        load_hf_weights(hf_folder(source), model)
        return model.state_dict()
    from model.checkpoint import Checkpointer

    where, step = split_checkpoint(source)
    state, _ = Checkpointer(where).load(step, keys=["model"])
    return state["model"]
