"""asyncflow's transformer against transformers on random tiny Llama / Qwen2 configs (CPU, fp32)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from asyncflow.models import ModelConfig, build_model, load_pretrained, save_pretrained  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6)

CASES = {
    "qwen2-gqa-tied": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                           num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2-mha-untied": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                             num_key_value_heads=4, tie_word_embeddings=False),
    "llama-gqa-untied": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                             num_key_value_heads=2, tie_word_embeddings=False),
    "llama-mqa-tied-bias": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                                num_key_value_heads=1, tie_word_embeddings=True,
                                attention_bias=True, mlp_bias=True),
    "llama3-rope": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                        num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=32)),
    "qwen2.5-yarn": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                         num_key_value_heads=2, rope_theta=1e6,
                         rope_scaling=dict(rope_type="yarn", factor=4.0,
                                           original_max_position_embeddings=32)),
    "llama-linear-rope": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                              num_key_value_heads=4, rope_scaling=dict(type="linear", factor=2.0)),
}


def _padded_batch(vocab: int):
    gen = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(0, vocab, (3, 40), generator=gen)
    mask_BT = torch.ones(3, 40, dtype=torch.long)
    mask_BT[1, :11] = 0  # left padding
    mask_BT[2, :25] = 0
    pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    return ids_BT, mask_BT, pos_BT


def _hf_model(tmp_path, hf_dict):
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in hf_dict.items()
                                               if k != "architectures"})
    cfg.architectures = hf_dict["architectures"]
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases so that every parameter matters
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path / "hf")
    return ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_on_padded_batch(tmp_path, case):
    ref = _hf_model(tmp_path, {**BASE, **CASES[case]})
    ours = load_pretrained(tmp_path / "hf")
    ids_BT, mask_BT, pos_BT = _padded_batch(BASE["vocab_size"])
    with torch.no_grad():
        want = ref(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT).logits
        got = ours(ids_BT, position_ids=pos_BT, attention_mask=mask_BT)
    real = mask_BT.bool()
    diff = (want - got).abs()[real].max().item()
    assert diff <= 1e-5, f"{case}: max abs logit diff {diff}"


@pytest.mark.parametrize("case", ["qwen2-gqa-tied", "llama-gqa-untied"])
def test_saved_checkpoint_loads_in_transformers_without_warnings(tmp_path, case, caplog):
    cfg = ModelConfig.from_hf_dict({**BASE, **CASES[case]})
    model = build_model(cfg)
    model.init_weights(seed=1)
    save_pretrained(model, tmp_path / "ours")
    with caplog.at_level("WARNING"):
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "ours", output_loading_info=True)[1]
    assert all(not v for v in info.values()), info
    assert not [r for r in caplog.records if "weight" in r.getMessage().lower()]
    ids_BT, mask_BT, pos_BT = _padded_batch(BASE["vocab_size"])
    with torch.no_grad():
        want = ref(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT).logits
        got = model(ids_BT, position_ids=pos_BT, attention_mask=mask_BT)
    assert (want - got).abs()[mask_BT.bool()].max().item() <= 1e-5


def test_sharded_and_bf16_round_trip(tmp_path):
    cfg = ModelConfig.from_hf_dict({**BASE, **CASES["llama-gqa-untied"]})
    model = build_model(cfg)
    model.init_weights(seed=2)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=60_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    back = load_pretrained(tmp_path / "sharded")
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    back16 = load_pretrained(tmp_path / "bf16", dtype=None)
    assert back16.lm_head.weight.dtype == torch.bfloat16
    assert back16.model.inv_freq.dtype == torch.float32  # RoPE frequencies never downcast
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    ids_BT = torch.randint(0, BASE["vocab_size"], (2, 16))
    with torch.no_grad():
        diff = (ref16(input_ids=ids_BT).logits.float() - back16(ids_BT).float()).abs().max()
    assert diff <= 0.05, diff


def test_meta_device_build_allocates_nothing():
    cfg = ModelConfig.from_hf_dict({**BASE, **CASES["qwen2-gqa-tied"]})
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()
