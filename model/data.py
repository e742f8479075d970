"""Deterministic, resumable batches: the batch of global step s is a pure function of (seed, s, B).

A split of a staged dataset is cut into sequences of seq_len + 1 tokens (input plus the target
shifted by one); sequence i of a shard starts at token i * seq_len, so consecutive sequences share
one token and none crosses a shard boundary. Global sample g = step * B + j is sequence
permutation(seed, epoch)[g % n] with epoch = g // n: every epoch visits each sequence exactly
once, resuming needs only the step, and every world size sees the same global batches.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model.errors import DataError
from model.shards import Manifest, read_manifest, read_shard

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenDataset:
    """One split of a staged dataset (a directory with manifest.json), shards memory-mapped.

    With `shard_ready`, shards are opened lazily and `shard_ready(name)` runs first, so training can
    start while later shards are still downloading (see model/staged.py): the hook blocks until that
    shard is in place. Without it every shard is opened and checked up front.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: Literal["train", "val"],
        seq_len: int,
        shard_ready: Callable[[str], None] | None = None,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len}")
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.manifest: Manifest = read_manifest(data_dir)
        self.shard_ready = shard_ready
        self._infos = self.manifest.shards(split)
        self.shards: list[np.ndarray | None] = [None] * len(self._infos)
        if shard_ready is None:
            for k in range(len(self._infos)):
                self._shard(k)
        per_shard = [max(info.tokens - 1, 0) // seq_len for info in self._infos]
        self._starts = np.cumsum([0, *per_shard])  # first sequence id of each shard
        self.n_sequences = int(self._starts[-1])
        if self.n_sequences == 0:
            sizes = [info.tokens for info in self._infos]
            raise ValueError(
                f"{split} split of {data_dir} has no full sequence of seq_len + 1 = {seq_len + 1} tokens "
                f"(shard sizes: {sizes or 'no shards'}); use a smaller seq_len or more data"
            )

    def _shard(self, k: int) -> np.ndarray:
        """Shard k, memory-mapped on first use and checked against the manifest."""
        shard = self.shards[k]
        if shard is None:
            info = self._infos[k]
            if self.shard_ready is not None:
                self.shard_ready(info.name)
            try:
                shard = read_shard(self.data_dir / info.name)
            except ValueError as e:  # missing, not a shard, truncated: it stays so however often we retry
                raise DataError(str(e)) from None
            if shard.size != info.tokens:
                raise DataError(f"{info.name} holds {shard.size} tokens, the manifest says {info.tokens}")
            self.shards[k] = shard
        return shard

    def __len__(self) -> int:
        return self.n_sequences

    def sequence(self, i: int) -> np.ndarray:
        """Sequence i: seq_len + 1 tokens (a read-only view of the shard)."""
        if not 0 <= i < self.n_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.n_sequences})")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        start = (i - int(self._starts[shard])) * self.seq_len
        return self._shard(shard)[start : start + self.seq_len + 1]

    def sequences(self, ids: np.ndarray) -> np.ndarray:
        """Stack the given sequences into an int64 array [len(ids), seq_len + 1]."""
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(ids):
            out[row] = self.sequence(int(i))
        if out.size and (top := int(out.max())) >= self.manifest.vocab_size:  # the embedding would fail on it
            raise DataError(
                f"token id {top} >= vocab_size {self.manifest.vocab_size} of the manifest ({self.split} "
                f"split of {self.data_dir}): the shards do not belong to this manifest; stage it again"
            )
        return out


@lru_cache(maxsize=2)  # a batch spans at most two epochs unless it is larger than the data
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


def global_batch_ids(seed: int, step: int, global_batch_seqs: int, n_sequences: int) -> np.ndarray:
    """Sequence ids of the global batch of `step` (all ranks, in order)."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    if global_batch_seqs <= 0 or n_sequences <= 0:
        raise ValueError(
            f"global_batch_seqs ({global_batch_seqs}) and n_sequences ({n_sequences}) must be positive"
        )
    g = step * global_batch_seqs + np.arange(global_batch_seqs, dtype=np.int64)
    epochs, pos = np.divmod(g, n_sequences)
    ids = np.empty_like(g)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        ids[mask] = _permutation(seed, int(epoch), n_sequences)[pos[mask]]
    return ids


def _to_batch(tokens: np.ndarray, device: str | torch.device) -> Batch:
    """[b, seq_len + 1] int64 -> (x, y) LongTensors on `device`, y shifted by one."""
    t = torch.from_numpy(tokens)
    device = torch.device(device)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class BatchLoader:
    """This rank's micro batches for any step; no state, so resuming is just asking for step s."""

    def __init__(
        self,
        dataset: TokenDataset,
        global_batch_seqs: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if micro_batch_size <= 0 or global_batch_seqs <= 0:
            raise ValueError(
                f"global_batch_seqs ({global_batch_seqs}) and micro_batch_size ({micro_batch_size}) "
                "must be positive"
            )
        if global_batch_seqs % (world_size * micro_batch_size):
            raise ValueError(
                f"global_batch_seqs ({global_batch_seqs}) must be a multiple of world_size ({world_size}) "
                f"x micro_batch_size ({micro_batch_size}) = {world_size * micro_batch_size}"
            )
        self.dataset, self.seed, self.device = dataset, seed, device
        self.global_batch_seqs, self.micro_batch_size = global_batch_seqs, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.grad_accum = global_batch_seqs // (world_size * micro_batch_size)

    def rank_ids(self, step: int) -> np.ndarray:
        """This rank's contiguous slice of the global batch ids."""
        ids = global_batch_ids(self.seed, step, self.global_batch_seqs, self.dataset.n_sequences)
        per_rank = self.global_batch_seqs // self.world_size
        return ids[self.rank * per_rank : (self.rank + 1) * per_rank]

    def micro_batches(self, step: int) -> list[Batch]:
        """grad_accum (x, y) pairs of LongTensor [micro_batch_size, seq_len], in order."""
        tokens = self.dataset.sequences(self.rank_ids(step))
        mbs = self.micro_batch_size
        return [_to_batch(tokens[k * mbs : (k + 1) * mbs], self.device) for k in range(self.grad_accum)]


def eval_batches(
    dataset: TokenDataset,
    n_batches: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> list[Batch]:
    """Fixed held-out batches: the first n_batches * micro_batch_size sequences (wrapping if fewer).

    The ranks split that same set in contiguous slices, so the evaluated sequences, and the mean
    loss over them, do not depend on the world size; every rank gets the same number of batches.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    if n_batches <= 0 or micro_batch_size <= 0:
        raise ValueError(
            f"n_batches ({n_batches}) and micro_batch_size ({micro_batch_size}) must be positive"
        )
    total = n_batches * micro_batch_size
    if total % world_size:
        raise ValueError(
            f"eval set of n_batches ({n_batches}) x micro_batch_size ({micro_batch_size}) = {total} "
            f"sequences does not split evenly over world_size ({world_size})"
        )
    per_rank = total // world_size
    ids = np.arange(rank * per_rank, (rank + 1) * per_rank) % dataset.n_sequences
    tokens = dataset.sequences(ids)
    return [_to_batch(tokens[k : k + micro_batch_size], device) for k in range(0, per_rank, micro_batch_size)]
