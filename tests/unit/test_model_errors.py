"""Bad checkpoints and tokenizers are refused with one clear line, not a deep traceback."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTok
from tokenizers import models, pre_tokenizers

from asyncflow.models import (
    CheckpointError,
    ConfigFileError,
    ModelConfig,
    Tokenizer,
    TokenizerError,
    build_model,
    load_pretrained,
    save_pretrained,
)

CFG = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=32, hidden_size=32,
           intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
           num_key_value_heads=1, tie_word_embeddings=True)


def _saved(tmp_path):
    model = build_model(ModelConfig.from_hf_dict(CFG))
    model.init_weights()
    return save_pretrained(model, tmp_path / "m")


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


def test_missing_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_missing_config_json(tmp_path):
    path = _saved(tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ConfigFileError, match="config.json: no such file") as e:
        load_pretrained(path)
    _one_line(e.value)


def test_malformed_config_json(tmp_path):
    path = _saved(tmp_path)
    (path / "config.json").write_text('{"vocab_size": 32,')
    with pytest.raises(ConfigFileError, match="not valid JSON") as e:
        load_pretrained(path)
    _one_line(e.value)


def test_config_missing_required_key(tmp_path):
    path = _saved(tmp_path)
    d = json.loads((path / "config.json").read_text())
    del d["hidden_size"]
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigFileError, match="hidden_size"):
        load_pretrained(path)


def test_unsupported_architecture(tmp_path):
    path = _saved(tmp_path)
    d = json.loads((path / "config.json").read_text())
    d["architectures"], d["model_type"] = ["MistralForCausalLM"], "mistral"
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigFileError, match="unsupported architecture 'MistralForCausalLM'") as e:
        load_pretrained(path)
    _one_line(e.value)


def test_unsupported_rope_type():
    with pytest.raises(ConfigFileError, match="rope_scaling type 'longrope'"):
        ModelConfig.from_hf_dict({**CFG, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_tensor_shape_contradicts_config(tmp_path):
    path = _saved(tmp_path)
    d = json.loads((path / "config.json").read_text())
    d["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape \[\d+, \d+\]") as e:
        load_pretrained(path)
    _one_line(e.value)


def test_missing_and_unexpected_tensors(tmp_path):
    path = _saved(tmp_path)
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    state.pop("model.norm.weight")
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['model.norm.weight'\].*unexpected") as e:
        load_pretrained(path)
    _one_line(e.value)


def test_missing_weights_file(tmp_path):
    path = _saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(path)


def _char_tokenizer(tmp_path, n: int):
    vocab = {f"c{i}": i for i in range(n)}
    tok = HFTok(models.WordLevel(vocab, unk_token="c0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_larger_than_model_vocab(tmp_path):
    tok = _char_tokenizer(tmp_path, 40)
    with pytest.raises(TokenizerError, match="tokenizer has 40 tokens but the model embeds only 32"):
        tok.check_fits(ModelConfig.from_hf_dict(CFG).vocab_size)
    _char_tokenizer(tmp_path, 32).check_fits(32)  # equal sizes are fine


def test_missing_or_corrupt_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be read") as e:
        Tokenizer.from_pretrained(tmp_path)
    _one_line(e.value)
