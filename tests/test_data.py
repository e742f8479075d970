"""Batches are a pure function of (seed, step, global batch): resumable and world-size invariant."""

import numpy as np
import pytest
import torch

from model.data import BatchLoader, Mixture, TokenDataset, eval_batches, global_batch_ids
from model.errors import DataError
from model.shards import Manifest, write_manifest, write_shard

SEQ = 8


@pytest.fixture
def synthetic(tmp_path):
    """Three train shards of 100, 37 and 5 tokens (token value = global position) and one val shard."""
    sizes, start, infos = [100, 37, 5], 0, []
    for k, n in enumerate(sizes):
        infos.append(write_shard(tmp_path / f"train_{k:06d}.bin", np.arange(start, start + n), "uint16"))
        start += n
    val = write_shard(tmp_path / "val_000000.bin", np.arange(1000, 1030), "uint16")
    write_manifest(
        tmp_path,
        Manifest(
            dataset="synthetic",
            tokenizer_sha256="0" * 64,
            vocab_size=4096,
            eot_id=0,
            dtype="uint16",
            shard_tokens=100,
            val_fraction=0.1,
            train=infos,
            val=[val],
            train_tokens=start,
            val_tokens=30,
        ),
    )
    return tmp_path


def _stack(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_sequences_never_cross_shards(synthetic):
    ds = TokenDataset(synthetic, "train", SEQ)
    # (100 - 1) // 8 = 12 sequences in shard 0, (37 - 1) // 8 = 4 in shard 1, none in the 5-token shard
    assert ds.n_sequences == len(ds) == 16
    np.testing.assert_array_equal(ds.sequence(0), np.arange(0, 9))
    np.testing.assert_array_equal(ds.sequence(11), np.arange(88, 97))
    np.testing.assert_array_equal(ds.sequence(12), np.arange(100, 109))  # shard 1 starts afresh
    np.testing.assert_array_equal(ds.sequence(15), np.arange(124, 133))
    with pytest.raises(IndexError):
        ds.sequence(16)
    assert ds.sequences(np.array([15, 0])).dtype == np.int64
    assert TokenDataset(synthetic, "val", SEQ).n_sequences == (30 - 1) // SEQ


def test_split_without_a_full_sequence_is_a_clear_error(synthetic):
    with pytest.raises(ValueError, match=r"val split .* no full sequence of seq_len \+ 1 = 31 tokens"):
        TokenDataset(synthetic, "val", 30)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        TokenDataset(synthetic, "train", 0)


def test_dataset_checks_shards_against_manifest(synthetic):
    write_shard(synthetic / "train_000001.bin", np.arange(36), "uint16")
    with pytest.raises(ValueError, match="train_000001.bin holds 36 tokens, the manifest says 37"):
        TokenDataset(synthetic, "train", SEQ)


def test_global_batch_is_a_pure_function_of_seed_and_step():
    a = [global_batch_ids(7, s, 6, 50) for s in range(12)]
    b = [global_batch_ids(7, s, 6, 50) for s in reversed(range(12))][::-1]  # another order, cache warm
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(global_batch_ids(7, 3, 6, 50), global_batch_ids(8, 3, 6, 50))
    assert not np.array_equal(global_batch_ids(7, 3, 6, 50), global_batch_ids(7, 4, 6, 50))


@pytest.mark.parametrize("batch, n", [(4, 10), (7, 10), (25, 10), (3, 3), (1, 1)])
def test_every_epoch_visits_each_sequence_once(batch, n):
    """Steps straddling an epoch boundary (or batches larger than the data) still cover each epoch."""
    epochs = 4
    steps = -(-epochs * n // batch)
    stream = np.concatenate([global_batch_ids(3, s, batch, n) for s in range(steps)])
    for e in range(epochs):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    if n > 3:  # epochs are shuffled differently
        assert not np.array_equal(stream[:n], stream[n : 2 * n])


def test_global_batch_ids_input_errors():
    with pytest.raises(ValueError, match="must be non-negative"):
        global_batch_ids(0, -1, 4, 10)
    with pytest.raises(ValueError, match=r"n_sequences \(0\) must be positive"):
        global_batch_ids(0, 0, 4, 0)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("micro", [1, 2])
def test_ranks_together_see_the_single_process_batch(synthetic, world_size, micro):
    ds = TokenDataset(synthetic, "train", SEQ)
    for step in (0, 1, 5):  # 8 sequences per step over 16: step 1 ends an epoch
        reference = _stack(BatchLoader(ds, 8, 8, seed=11).micro_batches(step))
        parts = [
            BatchLoader(ds, 8, micro, r, world_size, seed=11).micro_batches(step) for r in range(world_size)
        ]
        together = _stack([b for rank in parts for b in rank])
        assert torch.equal(together[0], reference[0]) and torch.equal(together[1], reference[1])


def test_micro_batches_shapes_and_targets(synthetic):
    ds = TokenDataset(synthetic, "train", SEQ)
    loader = BatchLoader(ds, 12, 3, rank=1, world_size=2, seed=5)
    assert loader.grad_accum == 2
    batches = loader.micro_batches(4)
    assert len(batches) == 2
    ids = global_batch_ids(5, 4, 12, ds.n_sequences)[6:12]
    for k, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (3, SEQ) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        rows = torch.from_numpy(ds.sequences(ids[3 * k : 3 * k + 3]))
        assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])
    assert torch.equal(_stack(loader.micro_batches(4))[0], _stack(batches)[0])  # asking again: same data


def test_seeds_give_different_batches(synthetic):
    ds = TokenDataset(synthetic, "train", SEQ)
    a = BatchLoader(ds, 8, 8, seed=0).micro_batches(0)[0][0]
    b = BatchLoader(ds, 8, 8, seed=1).micro_batches(0)[0][0]
    assert not torch.equal(a, b)


def test_bad_divisibility_names_all_three(synthetic):
    ds = TokenDataset(synthetic, "train", SEQ)
    with pytest.raises(
        ValueError, match=r"global_batch_seqs \(12\) .* world_size \(4\) x micro_batch_size \(2\)"
    ):
        BatchLoader(ds, 12, 2, rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"rank 2 must be in \[0, world_size=2\)"):
        BatchLoader(ds, 8, 2, rank=2, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_eval_batches_cover_the_same_sequences_for_any_world_size(synthetic, world_size):
    val = TokenDataset(synthetic, "val", SEQ)  # 3 sequences: 8 requested wrap around
    per_rank = [eval_batches(val, 2, 4, r, world_size) for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1  # same number of forward passes on every rank
    x, y = _stack([b for rank in per_rank for b in rank])
    ids = np.arange(8) % 3
    rows = torch.from_numpy(val.sequences(ids))
    assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])
    assert all(bx.shape[0] <= 4 for rank in per_rank for bx, _ in rank)


def test_eval_batches_uneven_split_is_an_error(synthetic):
    val = TokenDataset(synthetic, "val", SEQ)
    with pytest.raises(ValueError, match=r"6 sequences does not split evenly over world_size \(4\)"):
        eval_batches(val, 3, 2, 0, 4)


def test_loader_on_the_staged_corpus(tiny_dataset):
    data_dir, manifest = tiny_dataset
    ds = TokenDataset(data_dir, "train", 256)
    assert ds.manifest == manifest
    assert ds.n_sequences == sum((s.tokens - 1) // 256 for s in manifest.train)
    loader = BatchLoader(ds, 64, 16, seed=1337)
    batches = loader.micro_batches(3)
    assert len(batches) == loader.grad_accum == 4
    assert all(x.shape == (16, 256) and int(x.max()) < 4096 for x, _ in batches)
    assert len(eval_batches(TokenDataset(data_dir, "val", 256), 4, 16)) == 4


@pytest.mark.gpu
def test_batches_land_on_the_gpu(synthetic):
    ds = TokenDataset(synthetic, "train", SEQ)
    cpu = BatchLoader(ds, 8, 4, seed=2).micro_batches(1)
    gpu = BatchLoader(ds, 8, 4, seed=2, device="cuda").micro_batches(1)
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)


# ---------------------------------------------------------------- mixtures


def staged(path, first_token: int, n_tokens: int, tokenizer: str = "0" * 64):
    """A staged dataset of one train shard whose token values are first_token + position."""
    path.mkdir()
    info = write_shard(path / "train_000000.bin", np.arange(first_token, first_token + n_tokens), "uint16")
    val = write_shard(path / "val_000000.bin", np.arange(first_token, first_token + 20), "uint16")
    manifest = Manifest(
        dataset=path.name,
        tokenizer_sha256=tokenizer,
        vocab_size=40000,
        eot_id=0,
        dtype="uint16",
        shard_tokens=n_tokens,
        val_fraction=0.1,
        train=[info],
        val=[val],
        train_tokens=n_tokens,
        val_tokens=20,
    )
    write_manifest(path, manifest)
    return TokenDataset(path, "train", SEQ)


@pytest.fixture
def two_sources(tmp_path):
    """Source 0 has token values below 10000, source 1 at 20000 and above: a row tells its source."""
    return [staged(tmp_path / "a", 0, 8001), staged(tmp_path / "b", 20000, 4001)]


def source_of(rows: torch.Tensor) -> np.ndarray:
    return (rows[:, 0] >= 20000).long().numpy()


def test_a_mixture_gives_every_world_size_the_same_batches_in_the_weights_proportions(two_sources):
    mix = Mixture(two_sources, [0.7, 0.3])
    assert mix.counts.tolist() == [717, 307] and mix.share.sum() == 1.0
    batch, steps = 64, 48  # 3072 samples: three whole blocks
    one = BatchLoader(mix, batch, 8, 0, 1, seed=3)
    two = [BatchLoader(mix, batch, 4, r, 2, seed=3) for r in range(2)]
    drawn = []
    for step in range(steps):
        x1, _ = _stack(one.micro_batches(step))
        x2 = torch.cat([_stack(loader.micro_batches(step))[0] for loader in two])
        assert torch.equal(x1, x2), step
        drawn.append(source_of(x1))
    drawn = np.concatenate(drawn)
    assert np.bincount(drawn).tolist() == [3 * 717, 3 * 307] == mix.samples_by_source(3, batch * steps)
    assert mix.samples_by_source(3, 100) == np.bincount(drawn[:100], minlength=2).tolist()  # a partial block
    first = drawn[:64]
    assert 0.5 < first.mean() / 0.3 < 1.5  # mixed within a batch, not block by block


def test_each_source_of_a_mixture_visits_its_sequences_epoch_by_epoch(two_sources):
    """Source 1 (500 sequences) wraps within the first 2 blocks: its first 500 samples are each of its
    sequences once, as a lone dataset's first epoch is; and resuming at any step gives the same batch."""
    mix = Mixture(two_sources, [0.5, 0.5])
    loader = BatchLoader(mix, 32, 32, seed=1)
    rows = torch.cat([_stack(loader.micro_batches(s))[0] for s in range(64)])
    of_b = rows[source_of(rows) == 1][:500, 0].numpy()
    assert sorted(of_b.tolist()) == [20000 + SEQ * i for i in range(500)]
    fresh = BatchLoader(Mixture(two_sources, [0.5, 0.5]), 32, 32, seed=1)
    assert torch.equal(_stack(fresh.micro_batches(40))[0], rows[40 * 32 : 41 * 32])
    other_seed = BatchLoader(mix, 32, 32, seed=2)
    assert not torch.equal(_stack(other_seed.micro_batches(0))[0], rows[:32])


def test_a_lone_dataset_draws_the_batches_it_always_did(synthetic):
    """The mixture code path leaves a single dataset's batches as they were: permutation(seed, epoch)."""
    ds = TokenDataset(synthetic, "train", SEQ)
    loader = BatchLoader(ds, 6, 3, seed=5)
    for step in range(5):  # 6 samples a step over 16 sequences: epochs 0 to 1, as numpy draws them
        g = np.arange(step * 6, step * 6 + 6)
        epochs, pos = np.divmod(g, ds.n_sequences)
        ids = [np.random.default_rng([5, e]).permutation(16)[p] for e, p in zip(epochs, pos, strict=True)]
        expected = torch.from_numpy(ds.sequences(np.array(ids)))
        assert torch.equal(_stack(loader.micro_batches(step))[0], expected[:, :-1])


def test_mixtures_refuse_what_cannot_be_mixed(tmp_path, two_sources):
    other = staged(tmp_path / "c", 30000, 801, tokenizer="1" * 64)
    with pytest.raises(DataError, match="different tokenizers"):
        Mixture([two_sources[0], other], [1, 1])
    with pytest.raises(ValueError, match="below 1/1024"):
        Mixture(two_sources, [1.0, 0.0001])
    with pytest.raises(ValueError, match="positive"):
        Mixture(two_sources, [1.0, -1.0])
    with pytest.raises(ValueError, match="one weight per source"):
        Mixture(two_sources, [1.0])
