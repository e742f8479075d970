"""Export to a Hugging Face Llama checkpoint and load it back with the real transformers library."""

import json

import pytest
import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.export_hf import export_hf
from model.generate import generate

transformers = pytest.importorskip("transformers")

EOT = "<|endoftext|>"


def small_model(tie: bool, n_kv_heads: int, rope_theta: float) -> Decoder:
    cfg = ModelConfig(
        vocab_size=300,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        d_ff=96,
        seq_len=64,
        tie_embeddings=tie,
        rope_theta=rope_theta,
        norm_eps=1e-6,
        init_std=0.1,  # large enough that the logits are not flat and greedy decoding has clear winners
    )
    torch.manual_seed(0)
    return Decoder(cfg).eval()


def load_hf(path):
    return transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


@pytest.mark.parametrize(
    "tie, n_kv_heads, rope_theta",
    [(True, 2, 10000.0), (False, 2, 500000.0), (False, 4, 123.0), (True, 1, 31.0)],
)
def test_transformers_loads_the_export_and_agrees(tmp_path, tie, n_kv_heads, rope_theta):
    model = small_model(tie, n_kv_heads, rope_theta)
    out = export_hf(model.state_dict(), model.cfg, tmp_path / "hf", eot_id=7)
    assert out == tmp_path / "hf"
    hf = load_hf(out)
    assert hf.config.num_key_value_heads == n_kv_heads and hf.config.tie_word_embeddings == tie
    assert hf.config.rope_parameters["rope_theta"] == rope_theta
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()

    idx = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4

    prompt = idx[:, :6]
    ours = generate(model, prompt, 20, temperature=0)
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20, min_new_tokens=20
    )
    assert torch.equal(ours, theirs)


def test_config_and_file_layout(tmp_path):
    model = small_model(False, 2, 10000.0)
    out = export_hf(model.state_dict(), model.cfg, tmp_path / "hf", eot_id=5)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "lmctl_export.json",
        "model.safetensors",
    ]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]) == (64, 96, 16)
    assert cfg["max_position_embeddings"] == 64 and cfg["vocab_size"] == 300
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == 5
    assert cfg["attention_bias"] is False and cfg["mlp_bias"] is False and cfg["hidden_act"] == "silu"

    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" in tensors and "model.layers.1.self_attn.k_proj.weight" in tensors
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (96, 64)


def test_tied_export_has_no_lm_head(tmp_path):
    model = small_model(True, 2, 10000.0)
    out = export_hf(model.state_dict(), model.cfg, tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_accepts_compiled_and_ddp_state_dicts(tmp_path, prefix):
    model = small_model(True, 2, 10000.0)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    hf = load_hf(export_hf(sd, model.cfg, tmp_path / "hf"))
    torch.testing.assert_close(hf.model.embed_tokens.weight, model.tok_embeddings.weight)


def test_failed_export_leaves_nothing_and_keeps_a_previous_export(tmp_path):
    model = small_model(True, 2, 10000.0)
    out = export_hf(model.state_dict(), model.cfg, tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()
    broken = {k: v for k, v in model.state_dict().items() if "layers.1." not in k}
    with pytest.raises(ValueError, match=r"missing \['layers\.1\."):
        export_hf(broken, model.cfg, tmp_path / "hf", force=True)
    with pytest.raises(ValueError, match="wrong shape"):
        export_hf(model.state_dict(), model.cfg.model_copy(update={"d_ff": 128}), tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp dirs, no half-written "fresh"
    assert (out / "model.safetensors").read_bytes() == before


def test_tokenizer_files_load_in_transformers(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
    tok.train_from_iterator([text], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    eot_id = tok.token_to_id(EOT)

    model = small_model(True, 2, 10000.0)
    out = export_hf(
        model.state_dict(),
        model.cfg,
        tmp_path / "hf",
        tokenizer_json=tmp_path / "tokenizer.json",
        eot_id=eot_id,
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    sentence = "Whether 'tis nobler, or not: that is the question."
    assert hf_tok.encode(sentence, add_special_tokens=False) == tok.encode(sentence).ids
    assert hf_tok.eos_token == EOT and hf_tok.eos_token_id == eot_id
    assert hf_tok.model_max_length == model.cfg.seq_len
    assert hf_tok.decode(tok.encode(sentence).ids) == sentence
