"""Decoder shape arithmetic, init, KV cache, autocast/compile/checkpointing, and generation."""

import pytest
import torch
import torch.nn.functional as F

from model import decoder
from model.config import ModelConfig, param_count, preset_names, resolve
from model.decoder import CHECKPOINTING, Decoder
from model.generate import generate, top_k_filter, top_p_filter


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80, seq_len=32)
    return ModelConfig(**(base | kw))


def build(cfg: ModelConfig, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(cfg)


def tokens(cfg: ModelConfig, B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- shapes, parameters, init


@pytest.mark.parametrize("preset", preset_names())
@pytest.mark.parametrize("tie", [True, False])
def test_num_params_matches_config_arithmetic(preset, tie):
    cfg = resolve(preset, [f"model.tie_embeddings={str(tie).lower()}"]).model
    with torch.device("meta"):
        model = Decoder(cfg)
    assert model.num_params() == param_count(cfg)


def test_structure_names_other_code_relies_on():
    model = build(small_cfg())
    assert isinstance(model.tok_embeddings, torch.nn.Embedding)
    assert len(model.layers) == 2
    for name in ("attn_norm", "attn", "mlp_norm", "mlp"):
        assert hasattr(model.layers[0], name)
    assert model.lm_head.weight is model.tok_embeddings.weight
    untied = build(small_cfg(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_embeddings.weight
    vectors = [n for n, p in model.named_parameters() if p.dim() == 1]
    assert vectors and all(n.endswith("norm.weight") for n in vectors)  # no biases anywhere


def test_forward_shapes_and_loss_is_mean_cross_entropy_ignoring_minus_one():
    cfg = small_cfg()
    model = build(cfg)
    idx = tokens(cfg, 3, 20)
    logits = model(idx)
    assert logits.shape == (3, 20, cfg.vocab_size)
    targets = tokens(cfg, 3, 20, seed=2)
    targets[0, :7] = -1
    loss = model(idx, targets)
    keep = targets.flatten() != -1
    expected = F.cross_entropy(logits.flatten(0, 1)[keep], targets.flatten()[keep])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("chunk_tokens", [1000, 7, 1])  # one chunk; chunks of 7 tokens, the last one short
def test_fused_loss_matches_cross_entropy_and_its_gradients(monkeypatch, chunk_tokens):
    """The fused linear + cross-entropy gives autograd's loss and gradients, chunked or not, -1 ignored."""
    cfg = small_cfg()
    monkeypatch.setattr(decoder, "LOSS_CHUNK_ELEMENTS", chunk_tokens * cfg.vocab_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, cfg.d_model, generator=g, requires_grad=True)
    w = torch.randn(cfg.vocab_size, cfg.d_model, generator=g, requires_grad=True)
    y = torch.randint(0, cfg.vocab_size, (60,), generator=g)
    y[3:9] = -1
    want = F.cross_entropy(x @ w.t(), y, ignore_index=-1)
    (want * 3).backward()
    want_grads = x.grad, w.grad
    x.grad = w.grad = None
    got = decoder.linear_cross_entropy(x, w, y)
    (got * 3).backward()  # backward scales by the incoming gradient
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, want_grads[0], rtol=1e-5, atol=1e-6)  # matmuls by oneDNN vs MKL
    torch.testing.assert_close(w.grad, want_grads[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the same loss, no gradients computed
        torch.testing.assert_close(decoder.linear_cross_entropy(x, w, y), want, rtol=1e-6, atol=1e-6)


def test_fused_loss_under_bf16_autocast_tracks_fp32():
    cfg = small_cfg()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, cfg.d_model, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(cfg.vocab_size, cfg.d_model, generator=g)).requires_grad_()
    y = torch.randint(0, cfg.vocab_size, (40,), generator=g)
    F.cross_entropy(x @ w.t(), y).backward()
    want = w.grad.clone()
    w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = decoder.linear_cross_entropy(x, w, y)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert (w.grad - want).norm() / want.norm() < 2e-2  # bf16 operands


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("n_kv_heads", [2, 6])
def test_incremental_decoding_with_cache_matches_full_forward(n_kv_heads):
    cfg = small_cfg(n_kv_heads=n_kv_heads)
    model = build(cfg).eval()
    idx = tokens(cfg, 2, 24)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 24)
        parts = [model(idx[:, a:b], cache=cache) for a, b in ((0, 9), (9, 10), (10, 16), (16, 17), (17, 24))]
    assert cache.length == 24
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_cache_overflow_is_a_clear_error():
    cfg = small_cfg()
    model = build(cfg)
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="KV cache holds 8"), torch.no_grad():
        model(tokens(cfg, 1, 9), cache=cache)


def test_rope_tables_extend_past_seq_len():
    cfg = small_cfg(seq_len=16)
    model = build(cfg).eval()
    idx = tokens(cfg, 1, 40)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(1, 40)
        steps = [model(idx[:, :10], cache=cache)] + [
            model(idx[:, t : t + 1], cache=cache) for t in range(10, 40)
        ]
    assert model.rope_cos.shape[0] >= 40
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- training modes


def test_every_activation_checkpointing_level_gives_the_same_gradients():
    cfg = small_cfg(n_layers=3)
    idx, targets = tokens(cfg, 2, 32), tokens(cfg, 2, 32, seed=5)
    grads, recomputed = [], []
    for level in CHECKPOINTING:
        model = build(cfg)
        model.set_activation_checkpointing(level)
        calls = []
        for i, block in enumerate(model.layers):
            block.register_forward_pre_hook(lambda *_, i=i, calls=calls: calls.append(i))
        model(idx, targets).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        recomputed.append(sorted(i for i in set(calls) if calls.count(i) == 2))
    assert recomputed == [[], [1], [0, 1, 2]]  # none, selective (every other block), full
    for other in grads[1:]:
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, rtol=1e-5, atol=1e-7)


def test_checkpointing_level_is_checked():
    model = build(small_cfg())
    model.set_activation_checkpointing(True)
    assert model.checkpointing == "full"
    with pytest.raises(ValueError, match="none, selective, full"):
        model.set_activation_checkpointing("some")


def test_bf16_autocast_trains_and_loss_is_fp32():
    cfg = small_cfg()
    model = build(cfg)
    idx, targets = tokens(cfg, 2, 32), tokens(cfg, 2, 32, seed=5)
    ref = model(idx, targets).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx), model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(loss.item() - ref) < 0.05


@pytest.mark.slow
def test_compiled_blocks_match_eager_with_one_graph_for_all_blocks():
    """Compiled per block: the same function, and the alike blocks share one compiled graph."""
    from torch._dynamo.utils import counters

    cfg = small_cfg(n_layers=3)
    model = build(cfg)
    idx, targets = tokens(cfg, 2, 32), tokens(cfg, 2, 32, seed=5)
    eager_logits = model(idx)
    model(idx, targets).backward()
    eager_grad = model.layers[0].mlp.down_proj.weight.grad.clone()
    model.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks()
    model(idx, targets).backward()
    assert counters["stats"]["unique_graphs"] == 1
    with torch.no_grad():
        logits = model(idx)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.layers[0].mlp.down_proj.weight.grad, eager_grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- generation


def test_greedy_generation_is_argmax_of_full_forward():
    cfg = small_cfg()
    model = build(cfg)
    prompt = tokens(cfg, 2, 5)
    out = generate(model, prompt, 8, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    assert torch.equal(generate(model, prompt, 8, temperature=0), out)
    with torch.no_grad():
        for t in range(5, 13):
            assert torch.equal(model(out[:, :t])[:, -1].argmax(-1), out[:, t])
    assert torch.equal(generate(model, prompt, 8, temperature=0.7, top_k=1), out)
    assert model.training  # generate restores the mode it found


def test_seeded_sampling_is_reproducible():
    cfg = small_cfg(init_std=0.2)  # a peaked distribution would make sampling look like greedy
    model = build(cfg)
    prompt = tokens(cfg, 3, 4)

    def sample(seed):
        return generate(
            model, prompt, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_generation_stops_when_every_row_has_produced_eot():
    cfg = small_cfg()
    model = build(cfg)
    prompt = tokens(cfg, 1, 4)
    greedy = generate(model, prompt, 10, temperature=0)
    eot = int(greedy[0, 6])  # the third generated token
    out = generate(model, prompt, 10, temperature=0, eot_id=eot)
    first = (greedy[0, 4:] == eot).nonzero()[0].item()
    assert out.shape[1] == 4 + first + 1 and out[0, -1] == eot


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist()
    assert kept(0.39) == [1]
    assert kept(0.41) == [1, 3]
    assert kept(0.69) == [1, 3]
    assert kept(0.71) == [1, 3, 4]
    assert kept(0.96) == [0, 1, 2, 3, 4]
    assert kept(1.0) == [0, 1, 2, 3, 4]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1  # the top token always survives


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    assert torch.isfinite(top_k_filter(logits, 2))[0].tolist() == [False, True, False, True]
    assert torch.isfinite(top_k_filter(logits, 10)).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, message):
    cfg = small_cfg()
    with pytest.raises(ValueError, match=message):
        generate(build(cfg), tokens(cfg, 1, 3), 2, **kwargs)
