"""CUDA paths no CPU test reaches: run on a GPU machine with `pytest -m gpu` (python -m bench.gpu_check does).

Each test would have caught a bug found by reading the GPU path before it ever ran on one.
"""

import pytest
import torch
import torch.nn.functional as F

from model.config import resolve
from model.decoder import Decoder, linear_cross_entropy
from model.metrics import read_metrics

pytestmark = pytest.mark.gpu

SMALL = [
    "train.steps=6",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.checkpoint_every=3",
    "train.async_checkpoint=false",
]


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus_texts, tiny_tokenizer):
    from model.shards import prepare_dataset

    out = tmp_path_factory.mktemp("gpu_data")
    prepare_dataset(corpus_texts, tiny_tokenizer, out, 1 << 20, val_fraction=0.05, dataset="shakespeare")
    return str(out)


def test_cuda_rng_state_is_this_devices_only():
    """Saved and restored per device: a resume on fewer GPUs than were visible must not index past them."""
    from model.checkpoint import rng_state, set_rng_state

    torch.randn(1, device="cuda")
    state = rng_state()
    assert isinstance(state["cuda"], torch.Tensor)
    a = torch.randn(8, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.randn(8, device="cuda"), a)
    set_rng_state({"cuda": [state["cuda"]] * 8})  # an older checkpoint of an 8-GPU node
    assert torch.equal(torch.randn(8, device="cuda"), a)


def test_one_gpu_fsdp_trains_in_bf16_like_ddp(data, tmp_path):
    from model.train import train

    runs = {}
    for name, extra in (("ddp", []), ("fsdp", ["train.parallel=fsdp"]), ("fp32", ["train.precision=fp32"])):
        train(resolve("tiny", [f"data.path={data}", *SMALL, *extra]), tmp_path / name, device="cuda")
        runs[name] = losses(tmp_path / name)
    assert runs["fsdp"] == runs["ddp"]  # one GPU: no sharding, the same bf16 autocast
    assert runs["fp32"] != runs["ddp"] and runs["fp32"] == pytest.approx(runs["ddp"], abs=0.05)


def test_resume_on_cuda_tracks_an_uninterrupted_run(data, tmp_path):
    from model.train import train

    spec = resolve("tiny", [f"data.path={data}", *SMALL, "train.checkpoint_every=100"])
    train(spec, tmp_path / "straight", device="cuda")
    first = train(spec, tmp_path / "resumed", device="cuda", stop_at=3)
    train(spec, tmp_path / "resumed", device="cuda")
    assert first.step == 3
    # GPU kernels (attention's backward) are not bit-deterministic: the same bound as two uninterrupted runs
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), abs=2e-3)


def test_auto_checkpointing_is_resolved_for_this_gpu():
    from model.memory import choose
    from model.train import Dist, fit_to_device

    spec = resolve("1b")
    d = Dist(0, 1, 0, torch.device("cuda", 0))
    fitted = fit_to_device(spec, d)
    total = torch.cuda.get_device_properties(0).total_memory
    want = choose(spec, 1, total)
    assert (fitted.train.activation_checkpointing, fitted.train.micro_batch_size) == want


def test_fp32_grouped_attention_keeps_no_t_by_t_scores():
    """fp32 + GQA has no fused CUDA kernel; K/V are expanded rather than falling back to math attention."""
    cfg = resolve(
        "tiny",
        [
            "model.seq_len=2048",
            "model.n_heads=8",
            "model.n_kv_heads=2",
            "model.d_model=256",
            "train.micro_batch_size=1",
        ],
    ).model
    torch.manual_seed(0)
    model = Decoder(cfg).cuda()
    idx = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = model(idx, idx)
    loss.backward()
    # The math kernel would keep each layer's fp32 T x T attention probabilities for backward: 128 MiB each.
    # Measured on an H200 with K/V expanded: 161 MiB for the whole step, the activations alone.
    scores = cfg.n_heads * 2048 * 2048 * 4
    assert torch.cuda.max_memory_allocated() - base < cfg.n_layers * scores
    ref = Decoder(cfg).double()
    ref.load_state_dict({k: v.double().cpu() for k, v in model.state_dict().items()})
    assert loss.item() == pytest.approx(ref(idx.cpu(), idx.cpu()).item(), rel=1e-4)


def test_fused_loss_in_bf16_tracks_the_fp32_cross_entropy():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, 512, device="cuda", generator=g, requires_grad=True)
    w = (0.05 * torch.randn(32768, 512, device="cuda", generator=g)).requires_grad_()
    y = torch.randint(0, 32768, (8192,), device="cuda", generator=g)
    want = F.cross_entropy(x.double() @ w.double().t(), y)
    want.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, w, y)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-2)
    for a, b in ((x.grad, gx), (w.grad, gw)):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-2  # bf16 operands


def test_compiled_blocks_in_bf16_track_eager():
    cfg = resolve("tiny").model
    torch.manual_seed(0)
    model = Decoder(cfg).cuda()
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(idx, idx).item()
        model.compile_blocks()
        compiled = model(idx, idx).item()
    assert compiled == pytest.approx(eager, rel=1e-2)
