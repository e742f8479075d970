"""Import Hugging Face Llama folders (written by transformers itself, or by our export) into our Decoder."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import resolve
from model.decoder import Decoder
from model.errors import ConfigError
from model.export_hf import export_hf
from model.import_hf import import_hf, load_hf_tokenizer, load_hf_weights, read_hf_config
from model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."] * 3


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300)


def hf_llama(tie: bool, seed: int = 0, **config):
    """A random LlamaForCausalLM (GQA, non-default theta and eps) with norms away from 1, in eval mode."""
    cfg = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,  # our trained tokenizer's <|endoftext|>
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg | config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_hf(model, folder, tokenizer, **kwargs):
    model.save_pretrained(folder, **kwargs)
    tokenizer.save(folder / "tokenizer.json")
    return folder


def logits_match(ours: Decoder, hf) -> None:
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours.eval()(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_checkpoint_imports_with_equal_logits(tmp_path, tokenizer, tie):
    hf = hf_llama(tie)
    cfg, model, tok = import_hf(save_hf(hf, tmp_path / "hf", tokenizer))
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (64, 2, 4, 2, 96)
    assert (cfg.vocab_size, cfg.seq_len, cfg.rope_theta, cfg.norm_eps) == (512, 128, 50000.0, 1e-5)
    assert cfg.tie_embeddings is tie and cfg.init_std == 0.1
    assert (model.lm_head.weight is model.tok_embeddings.weight) is tie
    assert model.num_params() == sum(p.numel() for p in hf.parameters())
    assert tok.sha256 == tokenizer.sha256 and tok.eot_id == 0
    logits_match(model, hf)


def test_sharded_and_bf16_checkpoints_load_the_same(tmp_path, tokenizer):
    hf = hf_llama(False, seed=3)
    _, single, _ = import_hf(save_hf(hf, tmp_path / "single", tokenizer))
    sharded = save_hf(hf, tmp_path / "sharded", tokenizer, max_shard_size="50KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and not (sharded / "model.safetensors").exists()
    _, model, _ = import_hf(sharded)
    for (name, a), b in zip(single.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    logits_match(model, hf)

    _, half, _ = import_hf(save_hf(hf.to(torch.bfloat16), tmp_path / "bf16", tokenizer))
    assert all(p.dtype == torch.float32 for p in half.parameters())
    torch.testing.assert_close(
        half.tok_embeddings.weight, hf.model.embed_tokens.weight.float(), rtol=0, atol=0
    )


@pytest.mark.parametrize("tie", [True, False])
def test_export_then_import_is_exact(tmp_path, tokenizer, tie):
    cfg = resolve("tiny").model.model_copy(update={"tie_embeddings": tie, "rope_theta": 1234.5})
    torch.manual_seed(0)
    model = Decoder(cfg)
    tok_path = tmp_path / "tokenizer.json"
    tokenizer.save(tok_path)
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf", tok_path, eot_id=tokenizer.eot_id)
    got_cfg, got, tok = import_hf(out)
    assert got_cfg == cfg
    ours, theirs = model.state_dict(), got.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert tok.sha256 == tokenizer.sha256


BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def write_config(folder, **changes):
    folder.mkdir(exist_ok=True)
    raw = {k: v for k, v in (BASE | changes).items() if v is not ...}  # ... removes a field
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_defaults_of_a_sparse_config_are_llamas(tmp_path):
    cfg = read_hf_config(write_config(tmp_path, num_key_value_heads=..., max_position_embeddings=...))
    assert (cfg.n_kv_heads, cfg.seq_len, cfg.norm_eps, cfg.rope_theta) == (4, 2048, 1e-6, 10000.0)
    assert cfg.tie_embeddings is False and cfg.init_std == 0.02
    legacy = read_hf_config(write_config(tmp_path, rope_theta=5e5, rope_scaling=None, hidden_act="swish"))
    assert legacy.rope_theta == 5e5


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_type", "mistral"),
        ("architectures", ["LlamaForSequenceClassification"]),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
        ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
        ("rope_parameters", "default"),
        ("rope_theta", "big"),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("hidden_act", "gelu"),
        ("head_dim", 32),
        ("attention_dropout", 0.1),
        ("quantization_config", {"quant_method": "gptq", "bits": 4}),
        ("num_attention_heads", 3),
        ("num_key_value_heads", 3),
        ("hidden_size", ...),
        ("vocab_size", 64.5),
        ("rms_norm_eps", 2.0),
        ("initializer_range", 0.0),
        ("max_position_embeddings", 1),
    ],
)
def test_unsupported_config_is_one_line_naming_the_field(tmp_path, field, value):
    with pytest.raises(ConfigError, match=re.escape(field)) as err:
        read_hf_config(write_config(tmp_path, **{field: value}))
    assert "\n" not in str(err.value)


def test_rope_thetas_that_disagree_are_refused(tmp_path):
    folder = write_config(
        tmp_path, rope_theta=1e4, rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    )
    with pytest.raises(ConfigError, match="different RoPE thetas"):
        read_hf_config(folder)


def test_weights_are_strict(tmp_path, tokenizer):
    folder = save_hf(hf_llama(False), tmp_path / "hf", tokenizer)
    tensors = load_file(folder / "model.safetensors")
    cfg = read_hf_config(folder)

    def load(changed):
        save_file(changed, folder / "model.safetensors")
        load_hf_weights(folder, Decoder(cfg))

    inv_freq = 1.0 / (50000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    load(tensors | {"model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq})  # old checkpoints: checked
    with pytest.raises(ConfigError, match="inverse frequencies"):
        load(tensors | {"model.layers.0.self_attn.rotary_emb.inv_freq": 2 * inv_freq})
    with pytest.raises(ConfigError, match=r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]"):
        load(tensors | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(ConfigError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ConfigError, match=r"k_proj.weight has shape \(16, 64\).*\(32, 64\)"):
        load(tensors | {"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)})
    with pytest.raises(ConfigError, match="int8"):
        load(tensors | {"model.norm.weight": torch.zeros(64, dtype=torch.int8)})


def test_tied_checkpoint_with_a_different_lm_head_is_refused(tmp_path, tokenizer):
    folder = save_hf(hf_llama(True), tmp_path / "hf", tokenizer)
    tensors = load_file(folder / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    save_file(tensors | {"lm_head.weight": embed.clone()}, folder / "model.safetensors")
    import_hf(folder)  # saved anyway but equal: fine
    save_file(tensors | {"lm_head.weight": embed + 1}, folder / "model.safetensors")
    with pytest.raises(ConfigError, match="tie_word_embeddings is true but lm_head.weight differs"):
        import_hf(folder)


def test_missing_or_unusable_files_are_refused(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="is not a folder"):
        import_hf(tmp_path / "nothing")
    folder = write_config(tmp_path / "hf", eos_token_id=0)
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        import_hf(folder)
    (folder / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ConfigError, match="SentencePiece tokenizer.model"):
        load_hf_tokenizer(folder)
    tokenizer.save(folder / "tokenizer.json")
    with pytest.raises(ConfigError, match="neither model.safetensors nor model.safetensors.index.json"):
        import_hf(folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="only safetensors weights are read"):
        import_hf(folder)
    write_config(folder, eos_token_id=2)
    with pytest.raises(ConfigError, match=r"eos_token_id is 2 but tokenizer.json's end-of-text is 0"):
        load_hf_tokenizer(folder)
    write_config(folder, eos_token_id=[5, 0], vocab_size=256)
    with pytest.raises(
        ConfigError, match="tokenizer.json has 300 tokens but config.json's vocab_size is 256"
    ):
        import_hf(folder)


def test_a_tokenizer_that_is_not_byte_level_is_refused(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    backend = Backend(
        models.WordLevel({"<|endoftext|>": 0, "hello": 1, "▁world": 2}, unk_token="<|endoftext|>")
    )
    backend.add_special_tokens(["<|endoftext|>"])
    folder = write_config(tmp_path)
    backend.save(str(folder / "tokenizer.json"))
    with pytest.raises(ConfigError, match="not byte-level"):
        load_hf_tokenizer(folder)
