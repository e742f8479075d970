"""Use a trained run: load its newest committed checkpoint, sample text, export to Hugging Face.

The checkpoint carries the resolved config and the staged data folder, whose tokenizer.json is the one the
model was trained with (model/state.py reads it); nothing else needs to be passed around.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import RunSpec
from model.decoder import Decoder
from model.export_hf import check_export_target, export_hf
from model.generate import generate
from model.state import load_model
from model.tokenizer import Tokenizer


@dataclass
class TrainedModel:
    model: Decoder
    spec: RunSpec
    tokenizer_path: Path
    step: int

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)


def load_trained(checkpoints: str | Path, step: int | None = None, device: str = "cpu") -> TrainedModel:
    """The model of the newest committed checkpoint (or of `step`) under `checkpoints`, in eval mode.

    `checkpoints` is a run's checkpoint folder or store URI (s3://.../runs/<run>/checkpoints), or a run
    directory that has a checkpoints/ folder.
    """
    if not isinstance(checkpoints, str) or "://" not in checkpoints:
        checkpoints = Path(checkpoints)
        if (checkpoints / "checkpoints").is_dir():
            checkpoints = checkpoints / "checkpoints"
    model, spec, tokenizer_path, done = load_model(checkpoints, step)
    return TrainedModel(model.to(device).eval(), spec, tokenizer_path, done)


def sample(
    trained: TrainedModel,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    """Continue `prompt`; stops at end-of-text. Seeded, so the same call gives the same text. A setting out
    of range is a ValueError naming it (generate checks them before any work)."""
    tok = trained.tokenizer
    device = trained.model.lm_head.weight.device
    ids = torch.tensor([tok.encode(prompt) or [tok.eot_id]], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(trained.model, ids, max_new_tokens, temperature, top_k, top_p, tok.eot_id, gen)
    new = [i for i in out[0, ids.shape[1] :].tolist() if i != tok.eot_id]
    return tok.decode(new)


def _run_name(checkpoints: str | Path) -> str:
    """'dev' of .../runs/dev/checkpoints (a folder or a store URI), or of a run folder: what an export
    records as its origin."""
    parts = str(checkpoints).rstrip("/").split("/")
    return parts[-2] if parts[-1] == "checkpoints" and len(parts) > 1 else parts[-1]


def export_run(
    checkpoints: str | Path, out_dir: str | Path, step: int | None = None, force: bool = False
) -> Path:
    """Hugging Face Llama folder (config.json, model.safetensors, tokenizer files) of a run's checkpoint.

    `out_dir` must be new or an empty folder; a previous export (its lmctl_export.json names the run and
    step) is replaced only with `force`. Anything else there is refused before the checkpoint is loaded.
    """
    check_export_target(out_dir, force)
    trained = load_trained(checkpoints, step)
    origin = {"run": _run_name(checkpoints), "step": trained.step, "checkpoints": str(checkpoints)}
    return export_hf(
        trained.model.state_dict(),
        trained.spec.model,
        Path(out_dir),
        trained.tokenizer_path,
        trained.tokenizer.eot_id,
        force=force,
        origin=origin,
    )
