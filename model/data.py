"""Deterministic, resumable batches: the batch of global step s is a pure function of (seed, s, B).

A split of a staged dataset is cut into sequences of seq_len + 1 tokens (input plus the target
shifted by one); sequence i of a shard starts at token i * seq_len, so consecutive sequences share
one token and none crosses a shard boundary. Global sample g = step * B + j is sequence
permutation(seed, epoch)[g % n] with epoch = g // n: every epoch visits each sequence exactly
once, resuming needs only the step, and every world size sees the same global batches.

A Mixture draws global samples from several staged datasets in fixed proportions, at batch time (each
dataset is staged once and reused by any mixture); the same rules hold for it.
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

    def samples(self, seed: int | tuple[int, ...], g: np.ndarray) -> np.ndarray:
        """Tokens [len(g), seq_len + 1] of global samples g (see sample_ids)."""
        return self.sequences(sample_ids(seed, g, self.n_sequences))


@lru_cache(maxsize=8)  # a batch spans at most two epochs of each source unless it is larger than the data
def _permutation(key: tuple[int, ...], epoch: int, n: int) -> np.ndarray:
    perm = np.random.default_rng([*key, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


def sample_ids(seed: int | tuple[int, ...], g: np.ndarray, n_sequences: int) -> np.ndarray:
    """Sequence ids of global samples g: permutation(seed, g // n)[g % n], so every epoch visits each
    sequence once. `seed` may be a tuple (a mixture's source k uses (seed, k + 1))."""
    key = seed if isinstance(seed, tuple) else (seed,)
    epochs, pos = np.divmod(g, n_sequences)
    ids = np.empty_like(g)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        ids[mask] = _permutation(key, int(epoch), n_sequences)[pos[mask]]
    return ids


def global_batch_ids(seed: int, step: int, global_batch_seqs: int, n_sequences: int) -> np.ndarray:
    """Sequence ids of the global batch of `step` (all ranks, in order)."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    if global_batch_seqs <= 0 or n_sequences <= 0:
        raise ValueError(
            f"global_batch_seqs ({global_batch_seqs}) and n_sequences ({n_sequences}) must be positive"
        )
    return sample_ids(
        seed, step * global_batch_seqs + np.arange(global_batch_seqs, dtype=np.int64), n_sequences
    )


MIX_BLOCK = 1024  # global samples per block of a mixture: its composition is fixed, its order shuffled


class Mixture:
    """Several datasets (one split each, one tokenizer) drawn in fixed proportions at batch time.

    Global samples come in blocks of MIX_BLOCK: a block holds counts[k] samples of source k (the weights
    apportioned by largest remainder, the same for every block) in an order shuffled by (seed, block). So
    sample g's source, and its index h among that source's samples (block * counts[k] + its rank in the
    block), are pure functions of (seed, g): any world size sees the same batches, and each source visits
    its own sequences epoch by epoch, as a lone dataset does (sample_ids with seed (seed, k + 1)).
    """

    def __init__(self, sources: list[TokenDataset], weights: list[float], names: list[str] | None = None):
        if not sources or len(sources) != len(weights):
            raise ValueError(f"a mixture needs one weight per source: {len(sources)} sources, {len(weights)}")
        if not all(np.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"mixture weights must be positive numbers, got {weights}")
        shas = {s.manifest.tokenizer_sha256 for s in sources}
        if len(shas) > 1:
            raise DataError(
                "the datasets of a mixture were staged with different tokenizers; stage them "
                "with one (--tokenizer tokenizer.json of the first)"
            )
        share = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.counts = _apportion(share, MIX_BLOCK)
        if not self.counts.all():
            small = [f"{w:g}" for w, c in zip(weights, self.counts, strict=True) if not c]
            raise ValueError(f"mixture weight(s) {', '.join(small)} below 1/{MIX_BLOCK} of the total")
        self.sources, self.names = sources, names or [str(s.data_dir) for s in sources]
        self.share = self.counts / MIX_BLOCK  # the proportions drawn, as the weights round
        # the first source's folder and manifest stand for the mixture: its tokenizer is the run's
        self.seq_len, self.manifest, self.data_dir = (
            sources[0].seq_len,
            sources[0].manifest,
            sources[0].data_dir,
        )

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of blocks per step, and the mixture lives as long as the run
    def _block(self, seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank among that source's samples in the block) of each slot of `block`."""
        source = np.random.default_rng([seed, block, MIX_BLOCK]).permutation(
            np.repeat(np.arange(len(self.counts)), self.counts)
        )
        rank = np.empty(MIX_BLOCK, dtype=np.int64)
        for k in range(len(self.counts)):
            rank[source == k] = np.arange(self.counts[k])
        return source, rank

    def locate(self, seed: int, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source k, sample index h within source k) of each global sample g."""
        blocks, pos = np.divmod(g, MIX_BLOCK)
        source, h = np.empty_like(g), np.empty_like(g)
        for b in np.unique(blocks):
            mask = blocks == b
            src, rank = self._block(seed, int(b))
            source[mask] = src[pos[mask]]
            h[mask] = int(b) * self.counts[source[mask]] + rank[pos[mask]]
        return source, h

    def samples(self, seed: int, g: np.ndarray) -> np.ndarray:
        source, h = self.locate(seed, g)
        out = np.empty((len(g), self.seq_len + 1), dtype=np.int64)
        for k, ds in enumerate(self.sources):
            mask = source == k
            if mask.any():
                out[mask] = ds.samples((seed, k + 1), h[mask])
        return out

    def samples_by_source(self, seed: int, n: int) -> list[int]:
        """How many of the first n global samples each source gave (its tokens: x seq_len)."""
        full, rest = divmod(n, MIX_BLOCK)
        partial = np.bincount(self._block(seed, full)[0][:rest], minlength=len(self.counts)) if rest else 0
        return [int(c) for c in full * self.counts + partial]


def _apportion(share: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total` in proportion to `share` (largest remainder; ties to the first)."""
    exact = share * total
    counts = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[k] += 1
    return counts


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
        dataset: TokenDataset | Mixture,
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

    def rank_samples(self, step: int) -> np.ndarray:
        """This rank's contiguous slice of the global samples of `step`."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        per_rank = self.global_batch_seqs // self.world_size
        first = step * self.global_batch_seqs + self.rank * per_rank
        return np.arange(first, first + per_rank, dtype=np.int64)

    def micro_batches(self, step: int) -> list[Batch]:
        """grad_accum (x, y) pairs of LongTensor [micro_batch_size, seq_len], in order."""
        tokens = self.dataset.samples(self.seed, self.rank_samples(step))
        mbs = self.micro_batch_size
        return [_to_batch(tokens[k * mbs : (k + 1) * mbs], self.device) for k in range(self.grad_accum)]


def eval_batches(
    dataset: TokenDataset | Mixture,
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
    ids = np.arange(rank * per_rank, (rank + 1) * per_rank)
    # a mixture's held-out set: its first samples (seed 0), so every source is evaluated by its weight
    tokens = (
        dataset.samples(0, ids) if isinstance(dataset, Mixture) else dataset.sequences(ids % len(dataset))
    )
    return [_to_batch(tokens[k : k + micro_batch_size], device) for k in range(0, per_rank, micro_batch_size)]
