"""The training state: what a checkpoint holds, written once here, and the only code that reads it back.

model.pt and optim.pt hold full (unsharded) state dicts, one format whatever the parallelism or world size;
rng.pt the RNG states; meta.json the resolved config, data {path, tokenizer_sha256}, world_size, step and
tokens. No scheduler: the learning rate is a function of step and config (model/optim.py), so an extended
run takes its new schedule (older checkpoints' sched.pt is never read). torch is imported where tensors
are handled: `lmctl status` calls outcome().
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.checkpoint import Checkpointer, rng_state, set_rng_state
from model.config import ConfigError, RunSpec

if TYPE_CHECKING:
    from model.decoder import Decoder
    from model.train import Dist

STATE_KEYS = ["model", "optim", "rng"]


def sharded(spec: RunSpec, d: Dist) -> bool:
    """FSDP shards over two or more ranks; on one rank it would only add all-gathers of nothing."""
    return spec.train.parallel == "fsdp" and d.world_size > 1


class TrainingState:
    """One rank's model, optimizer and RNG, and the run's checkpoints under `root` (a folder or store URI):
    restore() on start, save(step) after a step. on_commit(step, seconds) runs once a save has committed
    (in the writer thread when async), with how long it took from the snapshot on."""

    def __init__(self, root, spec: RunSpec, raw, opt, d: Dist, tokenizer_sha256: str, on_commit=None):
        self.spec, self.raw, self.opt, self.d, self.tokenizer_sha256 = spec, raw, opt, d, tokenizer_sha256
        self.on_commit, self._began = on_commit, {}  # step -> when its save began
        t = spec.train
        self.ckpt = Checkpointer(
            root, keep=t.keep_checkpoints, async_save=t.async_checkpoint, on_commit=self._committed
        )

    def restore(self, step: int | None = None) -> int:
        """Load the newest committed checkpoint (or `step`) into model, optimizer, RNG: its step, else 0.
        A run with none yet starts from train.init_from's weights when it names some (a fresh optimizer)."""
        from torch.distributed.checkpoint import state_dict as sd

        options = sd.StateDictOptions(full_state_dict=True)
        loaded = self.ckpt.load(step, keys=STATE_KEYS)
        if loaded is None:
            if source := self.spec.train.init_from:
                from model.init_from import initial_state

                sd.set_model_state_dict(self.raw, initial_state(source, self.spec.model), options=options)
                if self.d.main:
                    print(f"initialised from {source}", flush=True)
            return 0
        state, meta = loaded
        check_compatible(self.spec, meta)
        sd.set_model_state_dict(self.raw, state["model"], options=options)
        sd.set_optimizer_state_dict(self.raw, self.opt, state["optim"], options=options)
        set_rng_state(state["rng"])
        return int(meta["step"])

    def capture(self, step: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, meta) of `step` for Checkpointer.save; None on a rank that takes no part. Under FSDP,
        gathering the full tensors is a collective: every rank takes part, into host memory. Otherwise
        rank 0 alone, and the Checkpointer's snapshot does the one device-to-host copy itself."""
        spec, every_rank = self.spec, sharded(self.spec, self.d)
        if not (self.d.main or every_rank):
            return None
        from torch.distributed.checkpoint import state_dict as sd

        options = sd.StateDictOptions(full_state_dict=True, cpu_offload=every_rank)
        state = {
            "model": sd.get_model_state_dict(self.raw, options=options),
            "optim": sd.get_optimizer_state_dict(self.raw, self.opt, options=options),
            "rng": rng_state(),
        }
        meta = {
            "config": spec.model_dump(mode="json"),
            "data": {"path": spec.data.path, "tokenizer_sha256": self.tokenizer_sha256},
            "world_size": self.d.world_size,
            "step": step,
            "tokens": step * spec.train.global_batch_tokens,
        }
        return state, meta

    def save(self, step: int) -> None:
        """Checkpoint `step`: rank 0 writes; async, it returns after the snapshot."""
        captured = self.capture(step)
        if captured is not None and self.d.main:
            self._began[step] = time.perf_counter()
            self.ckpt.save(step, *captured)

    def _committed(self, step: int) -> None:
        if self.on_commit:
            self.on_commit(step, time.perf_counter() - self._began.pop(step))

    def close(self) -> None:
        """Wait for the save in flight and re-raise its error: a run must not end as if it were saved."""
        self.ckpt.close()


def check_compatible(spec: RunSpec, meta: dict) -> None:
    """A checkpoint of another model shape cannot be resumed; a changed batch would change the data order."""
    saved = meta.get("config", {})
    if saved.get("model") and saved["model"] != spec.model.model_dump(mode="json"):
        raise ConfigError("the checkpoint was trained with a different model config; start a new run instead")
    saved_batch = saved.get("train", {}).get("global_batch_tokens")
    if saved_batch and saved_batch != spec.train.global_batch_tokens:
        print(
            f"warning: global_batch_tokens changed from {saved_batch} to {spec.train.global_batch_tokens}; "
            "the data order after the resume point differs from the original run",
            file=sys.stderr,
        )


def committed_step(checkpoints: str | Path) -> int:
    """The newest committed step under `checkpoints` (a folder or store URI), 0 before any; reads COMMITs."""
    return Checkpointer(checkpoints).latest() or 0


def outcome(checkpoints: str | Path, total_steps: int) -> tuple[str, int]:
    """How a run that ended cleanly ended, with its newest committed step: "finished" when its last step is
    committed, whatever its processes said as they ended; else "stopped". The driver and a cloud refresh."""
    step = committed_step(checkpoints)
    return ("finished" if step >= total_steps else "stopped"), step


def load_model(checkpoints: str | Path, step: int | None = None) -> tuple[Decoder, RunSpec, Path, int]:
    """(model on the CPU, spec, tokenizer.json path, step) of the newest committed checkpoint or of `step`."""
    from model.decoder import Decoder
    from model.staged import data_cache_dir, fetch_tokenizer

    ckpt = Checkpointer(checkpoints)
    if step is not None and step not in (steps := ckpt.committed_steps()):
        have = (
            f"committed steps: {', '.join(map(str, steps))}"
            if steps
            else "it has no committed checkpoint yet"
        )
        why = "pruned or never saved"
        raise ConfigError(f"step {step} is not a committed checkpoint of {ckpt.root} ({why}); {have}")
    loaded = ckpt.load(step, keys=["model"])
    if loaded is None:
        raise ConfigError(f"{checkpoints} has no committed checkpoint yet")
    state, meta = loaded
    spec = RunSpec.model_validate(meta["config"])
    model = Decoder(spec.model)
    model.load_state_dict(state["model"])
    return model, spec, fetch_tokenizer(meta["data"]["path"], data_cache_dir()), int(meta["step"])
