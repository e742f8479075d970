"""`lmctl plan`: every figure checked against arithmetic written out here from the preset YAMLs, and the
activation formula checked against what the real decoder saves for backward."""

import json
import math
import subprocess
import sys

import pytest

from model.config import preset_names, resolve
from model.errors import ConfigError
from orchestrator.gpus import CATALOG, parse_gpu
from orchestrator.plan import (
    PRICES_PATH,
    STRATEGIES,
    block_activation_bytes,
    head_activation_bytes,
    load_prices,
    lookup_price,
    make_plan,
    plan_renderable,
)

GIB = 2**30
OVERHEAD = 1.5 * GIB

# ---------------------------------------------------------------- hand arithmetic from the YAML numbers

# configs/124m.yaml: vocab 32768, d_model 768, 12 layers, 12 heads, 4 kv heads (head_dim 64), d_ff 2816,
# seq 1024, tied; 524288 tokens a step = 512 sequences; micro-batch 32; ddp, no checkpointing.
L124 = 2 * 768 * 768 + 2 * 768 * (4 * 64) + 3 * 768 * 2816  # wq+wo, wk+wv, SwiGLU: 8,060,928 per layer
N124 = 32768 * 768 + (2 * 12 + 1) * 768 + 12 * L124  # tied embedding counted once
M124 = 12 * L124 + 32768 * 768  # matmul weights incl. the (tied) head
FPT124 = 6 * M124 + 12 * 12 * 12 * 64 * 1024  # 6N + 12 L H Q T
A124 = 16 * 768 + 8 + 4 * 12 + 2 * (5 * 768 + 3 * 256 + 4 * 2816)  # per token per block, bf16
HEAD124 = 8 * 768 + 4 + 2 * 768 + 16

# configs/1b.yaml: vocab 32768, d_model 2048, 18 layers, 32 heads, 8 kv heads (head_dim 64), d_ff 8192,
# seq 2048, untied; 1048576 tokens a step = 512 sequences; micro-batch 4; ddp with checkpointing.
L1B = 2 * 2048 * 2048 + 2 * 2048 * (8 * 64) + 3 * 2048 * 8192  # 60,817,408 per layer
N1B = 2 * 32768 * 2048 + (2 * 18 + 1) * 2048 + 18 * L1B
M1B = 18 * L1B + 32768 * 2048
FPT1B = 6 * M1B + 12 * 18 * 32 * 64 * 2048
A1B = 16 * 2048 + 8 + 4 * 32 + 2 * (5 * 2048 + 3 * 512 + 4 * 8192)
HEAD1B = 8 * 2048 + 4 + 2 * 2048 + 16


def test_hand_figures_are_what_we_think():
    assert (L124, N124, M124, FPT124) == (8_060_928, 121_916_160, 121_896_960, 844_627_968)
    assert (L1B, N1B, M1B, FPT1B) == (60_817_408, 1_229_006_848, 1_161_822_208, 7_876_902_912)
    assert (A124, HEAD124, A1B, HEAD1B) == (44_088, 7_700, 121_992, 20_500)


def _usable(gb):
    return int(gb * GIB * 0.9)


# (preset, --gpu, expected micro-batch, per-GPU bytes of the config's strategy at that micro-batch)
# 124m, ddp: weights 4N + 2M (bf16 autocast copies), grads 4N (+4N DDP buckets when W > 1), AdamW 8N,
# activations T (12 A + head), logits T V (2 + 12), T = micro x 1024.
# 1b, ddp+ckpt: the same static terms; activations T (18 x 4 x 2048 + A + head), T = micro x 2048.
CASES = {
    ("124m", "RTX5090"): dict(
        world=1,
        micro=16,  # 32 needs 36.4e9 B > 90% of 32 GiB (30.9e9): see test below
        weights=4 * N124 + 2 * M124,
        gradients=4 * N124,
        optimizer=8 * N124,
        activations=16 * 1024 * (12 * A124 + HEAD124),
        logits=16 * 1024 * 32768 * 14,
        peak=209.5e12,
        fpt=FPT124,
        n=N124,
    ),
    ("124m", "H100-SXM:8"): dict(
        world=8,
        micro=32,
        weights=4 * N124 + 2 * M124,
        gradients=8 * N124,
        optimizer=8 * N124,
        activations=32 * 1024 * (12 * A124 + HEAD124),
        logits=32 * 1024 * 32768 * 14,
        peak=989e12,
        fpt=FPT124,
        n=N124,
    ),
    ("1b", "RTX5090"): dict(
        world=1,
        micro=4,
        weights=4 * N1B + 2 * M1B,
        gradients=4 * N1B,
        optimizer=8 * N1B,
        activations=4 * 2048 * (18 * 4 * 2048 + A1B + HEAD1B),
        logits=4 * 2048 * 32768 * 14,
        peak=209.5e12,
        fpt=FPT1B,
        n=N1B,
    ),
    ("1b", "H100-SXM:8"): dict(
        world=8,
        micro=4,
        weights=4 * N1B + 2 * M1B,
        gradients=8 * N1B,
        optimizer=8 * N1B,
        activations=4 * 2048 * (18 * 4 * 2048 + A1B + HEAD1B),
        logits=4 * 2048 * 32768 * 14,
        peak=989e12,
        fpt=FPT1B,
        n=N1B,
    ),
}


@pytest.mark.parametrize("preset, gpu", list(CASES))
def test_plan_matches_hand_arithmetic(preset, gpu):
    want = CASES[(preset, gpu)]
    req = parse_gpu(gpu)
    plan = make_plan(resolve(preset), req, price=0.5)
    world, micro = want["world"], want["micro"]
    assert (plan.params, plan.flops_per_token) == (want["n"], want["fpt"])
    assert (plan.gpu, plan.world, plan.gpus_per_node, plan.nodes) == (req.primary.name, world, world, 1)
    mem = plan.memory[plan.strategy]
    assert plan.strategy == ("ddp" if preset == "124m" else "ddp+ckpt")
    total = sum(want[k] for k in ("weights", "gradients", "optimizer", "activations", "logits")) + OVERHEAD
    assert (mem.micro_batch, mem.weights, mem.gradients, mem.optimizer) == (
        micro,
        want["weights"],
        want["gradients"],
        want["optimizer"],
    )
    assert (mem.activations, mem.logits, mem.overhead, mem.total) == (
        want["activations"],
        want["logits"],
        OVERHEAD,
        total,
    )
    assert mem.fits and total <= _usable(req.primary.memory_gb) and plan.fits
    assert (plan.micro_batch, plan.grad_accum) == (micro, 512 // (world * micro))
    tok_s = 0.40 * want["peak"] * world / want["fpt"]
    hours = 20 * want["n"] / tok_s / 3600
    assert plan.tokens_per_s == pytest.approx(tok_s, rel=1e-12)
    assert plan.token_budget == 20 * want["n"] and plan.tokens_per_param == pytest.approx(20)
    assert plan.hours == pytest.approx(hours, rel=1e-12)
    assert plan.cost == pytest.approx(hours * world * 0.5, rel=1e-12)
    assert (plan.price_per_gpu_hour, plan.price_source) == (0.5, "--price")


def test_124m_micro_batch_32_does_not_fit_a_5090_and_16_does():
    static = (4 * N124 + 2 * M124) + 4 * N124 + 8 * N124 + OVERHEAD
    at32 = static + 32 * 1024 * (12 * A124 + HEAD124) + 32 * 1024 * 32768 * 14
    at16 = static + 16 * 1024 * (12 * A124 + HEAD124) + 16 * 1024 * 32768 * 14
    assert at16 <= _usable(32) < at32
    plan = make_plan(resolve("124m"), parse_gpu("RTX5090"))
    assert plan.config_micro_batch == 32 and plan.micro_batch == 16
    assert any("use train.micro_batch_size=16" in n for n in plan.notes)
    # max micro per strategy: checkpointing frees the activations, so 32 fits there
    assert plan.memory["ddp"].max_micro_batch == 16 and plan.memory["ddp+ckpt"].max_micro_batch == 32


def test_1b_on_one_5090_needs_checkpointing():
    plan = make_plan(resolve("1b"), parse_gpu("RTX5090"))
    no_ckpt = (4 * N1B + 2 * M1B) + 4 * N1B + 8 * N1B + OVERHEAD
    no_ckpt += 4 * 2048 * (18 * A1B + HEAD1B) + 4 * 2048 * 32768 * 14
    assert plan.memory["ddp"].total == no_ckpt and not plan.memory["ddp"].fits
    assert plan.memory["ddp+ckpt"].fits


def test_fsdp_terms_by_hand():
    """1b on 8 H100s: fp32 shards over 8, bf16 root (embeddings + head + final norm) + two gathered blocks."""
    plan = make_plan(resolve("1b"), parse_gpu("H100-SXM:8"))
    root = 2 * 32768 * 2048 + 2048
    block = L1B + 2 * 2048  # matmuls + two RMSNorm weights
    assert root + 18 * block == N1B
    fsdp, ckpt = plan.memory["fsdp"], plan.memory["fsdp+ckpt"]
    assert fsdp.weights == 4 * N1B // 8 + 2 * (root + 2 * block)
    assert fsdp.gradients == 4 * N1B // 8 + 2 * (root + block) + 4 * block
    assert fsdp.optimizer == 8 * N1B // 8
    assert fsdp.activations == 4 * 2048 * (18 * A1B + HEAD1B)
    assert ckpt.activations == 4 * 2048 * (18 * 2 * 2048 + A1B + HEAD1B)  # bf16 residual under FSDP
    assert fsdp.logits == ckpt.logits == 4 * 2048 * 32768 * 14
    assert all(plan.memory[s].micro_batch == 4 for s in STRATEGIES)


def test_fp32_precision_doubles_activations_and_drops_the_bf16_copies():
    spec = resolve("124m", ["train.precision=fp32"])
    mem = make_plan(spec, parse_gpu("H100-SXM")).memory["ddp"]
    a4 = 16 * 768 + 8 + 4 * 12 + 4 * (5 * 768 + 3 * 256 + 4 * 2816)
    head4 = 8 * 768 + 4 + 4 * 768 + 16
    assert mem.weights == 4 * N124
    assert mem.activations == 32 * 1024 * (12 * a4 + head4)
    assert mem.logits == 32 * 1024 * 32768 * (4 + 12)


def test_fsdp_on_one_gpu_is_planned_as_what_train_py_does():
    plan = make_plan(resolve("124m", ["train.parallel=fsdp"]), parse_gpu("H100-SXM"))
    assert plan.memory["fsdp"].weights == 4 * N124  # unsharded, no autocast copies
    assert plan.memory["fsdp"].gradients == 4 * N124
    assert any("runs fp32" in n for n in plan.notes)


# ---------------------------------------------------------------- micro-batch and batch splitting


def test_micro_batch_that_does_not_split_the_batch_is_lowered():
    """124m on 32 GPUs: 512 sequences are 16 per GPU, so micro-batch 32 cannot be used."""
    plan = make_plan(resolve("124m"), parse_gpu("H100-SXM:8"), 4, cloud="aws")
    assert (plan.world, plan.micro_batch, plan.grad_accum) == (32, 16, 1)
    assert any("does not split the batch" in n for n in plan.notes)


def test_global_batch_that_does_not_split_over_the_world_is_an_error():
    with pytest.raises(ConfigError, match="512 sequences does not split over 24 GPUs"):
        make_plan(resolve("124m"), parse_gpu("H100-SXM:8"), 3, cloud="aws")


def test_a_config_that_fits_nowhere():
    big = resolve(
        "1b",
        ["model.d_model=8192", "model.n_layers=48", "model.n_heads=64", "model.d_ff=28672"],
    )
    plan = make_plan(big, parse_gpu("B200"), price=1.0)
    assert not plan.fits and plan.micro_batch is None and plan.grad_accum is None
    assert not any(m.fits or m.max_micro_batch for m in plan.memory.values())
    assert any("nothing fits on 1 GPU of any known kind" in n for n in plan.notes)
    assert plan.hours > 0 and plan.cost is not None  # time and cost are still estimated
    json.dumps(plan.to_dict())


def test_no_fit_suggests_a_strategy_or_a_bigger_gpu():
    plan = make_plan(resolve("1b"), parse_gpu("RTX4090"))
    assert not plan.fits
    (note,) = [n for n in plan.notes if n.startswith("does not fit")]
    assert "ddp+ckpt on RTX4090" in note and "even at micro-batch 1" in note
    assert "use more GPUs or one of" in note and "H100-SXM" in note and "RTX4090," not in note
    plan = make_plan(resolve("1b", ["train.activation_checkpointing=false"]), parse_gpu("RTX5090"))
    assert (plan.micro_batch, plan.grad_accum) == (1, 512)  # ddp alone: only micro-batch 1 fits a 5090
    plan = make_plan(resolve("1b", ["train.activation_checkpointing=false"]), parse_gpu("RTX4090:8"))
    (note,) = [n for n in plan.notes if n.startswith("does not fit")]
    assert "fsdp fits at micro-batch 2 (train.parallel=fsdp train.activation_checkpointing=none)" in note


# ---------------------------------------------------------------- prices


def test_shipped_price_table_is_consistent_with_the_catalog():
    raw = load_prices()
    assert "approximate" in raw["as_of"]
    for gpu, clouds in raw["prices"].items():
        for cloud, row in clouds.items():
            assert cloud in CATALOG[gpu].clouds, (gpu, cloud)  # priced only where offered
            assert "on_demand" in row and row.get("spot", 0) <= row["on_demand"]
    assert set(raw["prices"]) == set(CATALOG)  # every GPU has some price
    assert "approximate" in PRICES_PATH.read_text().split("prices:")[0]


def test_price_table_is_not_a_preset():
    assert not {"prices", "pricing"} & set(preset_names())


TABLE = {
    "as_of": "test",
    "prices": {
        "H100-SXM": {
            "runpod": {"on_demand": 2.5, "spot": 2.0},
            "lambda": {"on_demand": 2.2},
            "aws": {"on_demand": 6.0, "spot": 3.0},
            "gcp": {"on_demand": 9.0},
        },
        "H200": {"gcp": {"on_demand": 10.0}},
    },
}


@pytest.mark.parametrize(
    "gpu, cloud, spot, nodes, price, source, noted",
    [
        ("H100-SXM", None, False, 1, 2.2, "prices.yaml lambda on-demand (cheapest)", False),
        ("H100-SXM", None, True, 1, 2.0, "prices.yaml runpod spot (cheapest)", False),
        ("H100-SXM", None, True, 2, 3.0, "prices.yaml aws spot (cheapest)", False),  # no multi-node RunPod
        ("H100-SXM", "runpod", False, 1, 2.5, "prices.yaml runpod on-demand", False),
        ("H100-SXM", "aws", True, 1, 3.0, "prices.yaml aws spot", False),
        ("H100-SXM", "gcp", True, 1, 9.0, "prices.yaml gcp on-demand", True),  # no spot price: on-demand
        ("H200", None, True, 1, 10.0, "prices.yaml gcp on-demand (cheapest)", True),
        (
            "H100-SXM",
            "kubernetes",
            False,
            1,
            None,
            "no price for H100-SXM on kubernetes: pass --price",
            False,
        ),
        ("B200", None, False, 1, None, "no price for B200: pass --price", False),
    ],
)
def test_lookup_price(gpu, cloud, spot, nodes, price, source, noted):
    quote = lookup_price(CATALOG[gpu], cloud, spot, nodes=nodes, prices=TABLE)
    assert (quote.price, quote.source, quote.note is not None) == (price, source, noted)
    assert lookup_price(CATALOG[gpu], cloud, spot, price=1.25, prices=TABLE).source == "--price"


def test_shipped_cheapest_and_spot():
    raw = load_prices()["prices"]["H100-SXM"]
    plan = make_plan(resolve("1b"), parse_gpu("H100-SXM:8"))
    cheapest = min(row["on_demand"] for row in raw.values())
    assert plan.price_per_gpu_hour == cheapest and plan.price_source.endswith("(cheapest)")
    assert plan.cost == pytest.approx(plan.hours * 8 * cheapest)
    spot = make_plan(resolve("1b"), parse_gpu("H100-SXM:8"), cloud="aws", spot=True)
    assert (spot.price_per_gpu_hour, spot.price_source) == (raw["aws"]["spot"], "prices.yaml aws spot")


def test_no_price_means_no_cost():
    plan = make_plan(resolve("124m"), parse_gpu("RTX5090"), cloud="kubernetes")
    assert plan.price_per_gpu_hour is None and plan.cost is None and "pass --price" in plan.price_source
    plan = make_plan(resolve("124m"), parse_gpu("RTX5090"), cloud="kubernetes", price=0)
    assert plan.cost == 0


# ---------------------------------------------------------------- budget and options


def test_tokens_override():
    plan = make_plan(resolve("124m"), parse_gpu("H100-SXM:8"), tokens=1e9, price=2.0)
    tok_s = 0.40 * 989e12 * 8 / FPT124
    assert plan.token_budget == 1e9 and plan.tokens_per_param == pytest.approx(1e9 / N124)
    assert plan.hours == pytest.approx(1e9 / tok_s / 3600)
    assert plan.cost == pytest.approx(1e9 / tok_s / 3600 * 8 * 2.0)
    assert plan.steps_for_budget == math.ceil(1e9 / 524288)
    assert plan.config_tokens == 20000 * 524288


def test_mfu_and_tokens_per_param():
    plan = make_plan(resolve("124m"), parse_gpu("H100-SXM"), mfu=0.5, tokens_per_param=10)
    assert plan.tokens_per_s == pytest.approx(0.5 * 989e12 / FPT124)
    assert plan.token_budget == 10 * N124


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(mfu=0), "--mfu"),
        (dict(mfu=1.5), "--mfu"),
        (dict(price=-1.0), "--price"),
        (dict(price=float("nan")), "--price"),
        (dict(tokens=0), "--tokens"),
        (dict(tokens_per_param=0), "tokens per parameter"),
        (dict(cloud="runpod", nodes=2), "RunPod cannot run multi-node"),
        (dict(cloud="kubernetes", spot=True), "spot on Kubernetes"),
        (dict(cloud="gcp"), "RTX5090 is not offered on gcp"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        make_plan(resolve("124m"), parse_gpu("RTX5090"), **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_to_dict_is_json():
    plan = make_plan(resolve("1b"), parse_gpu("RTX5090,RTX4090"), spot=True)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["gpu"] == "RTX5090" and data["world"] == 1 and data["strategy"] == "ddp+ckpt"
    assert set(data["memory"]) == set(STRATEGIES)
    assert set(data["memory"]["fsdp"]) >= {"weights", "gradients", "optimizer", "activations", "logits"}
    assert data["memory"]["ddp+ckpt"]["fits"] is True and data["price_source"].startswith("prices.yaml")


def test_rendering():
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(plan_renderable(make_plan(resolve("1b"), parse_gpu("H100-SXM:8"), spot=True)))
    text = console.export_text()
    for fragment in ("1.2B params", "H100-SXM x 8 = 8", "spot", "micro-batch 4 x grad accum 16", "tokens/s"):
        assert fragment in text
    assert "ddp+ckpt *" in text and "fsdp+ckpt" in text and "✓" in text and "$" in text
    console = Console(record=True, width=140)
    console.print(plan_renderable(make_plan(resolve("1b"), parse_gpu("RTX4090"), cloud="kubernetes")))
    text = console.export_text()
    assert "does not fit" in text and "✗" in text and "pass --price" in text


def test_plan_imports_no_torch_or_sky():
    code = (
        "import sys, orchestrator.plan; print(sorted(m for m in ('torch', 'sky', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- the formula against the real decoder


def _saved_bytes_per_token(model, idx, targets, autocast):
    """Bytes of activations a forward saves for backward (parameters and their casts excluded)."""
    import torch

    B, T = idx.shape
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(idx, targets)
    # per-token tensors lead with B or B*T; weight casts and rotary tables do not
    total = sum(
        n for ptr, (n, shape) in seen.items() if ptr not in params and shape and shape[0] in (B, B * T)
    )
    return total / (B * T)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_activation_formula_is_what_the_decoder_saves(autocast, tie):
    """L x A + head + the loss's fp32 log-softmax (4V) per token, exactly, for a small decoder on the CPU."""
    torch = pytest.importorskip("torch")
    from model.decoder import Decoder

    over = [
        "model.vocab_size=512",
        "model.d_model=256",
        "model.n_layers=2",
        "model.n_heads=8",
        "model.n_kv_heads=2",
        "model.d_ff=688",
        "model.seq_len=128",
        f"model.tie_embeddings={str(tie).lower()}",
        "train.global_batch_tokens=512",
        "train.micro_batch_size=4",
    ]
    spec = resolve("tiny", over)
    torch.manual_seed(0)
    model = Decoder(spec.model)
    idx = torch.randint(0, 512, (4, 128))
    measured = _saved_bytes_per_token(model, idx, torch.randint(0, 512, (4, 128)), autocast)
    a = 2 if autocast else 4
    expected = 2 * block_activation_bytes(spec, a) + head_activation_bytes(spec, a) + 4 * 512
    assert measured == expected
