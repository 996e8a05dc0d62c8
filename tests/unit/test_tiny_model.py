"""The tiny default model: atomic cache, determinism, and parity with transformers.

Preparation runs with a tiny budget (xs model, stop at the first evaluation) so the module stays
fast; the real default (s, stop at 20% held-out accuracy) is exercised by `python -m
asyncflow.prepare`.
"""

import json
import logging

import pytest
import torch

from asyncflow.models import Tokenizer, load_pretrained
from asyncflow.tasks import AdditionConfig, AdditionTask, encode_prompt, split_completions
from asyncflow.tasks.tiny import (
    MARKER,
    SFTError,
    TinyModelConfig,
    build_char_tokenizer,
    default_cache_dir,
    greedy_completions,
    prepare_tiny_model,
    train_tiny_model,
)

transformers = pytest.importorskip("transformers")

FAST = dict(size="xs", eval_every=50, max_steps=50, stop_accuracy=0.0)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare_tiny_model(TinyModelConfig(**FAST), cache)


def test_prepared_directory_is_complete_and_atomic(prepared):
    cache, path = prepared
    assert path.parent == cache and sorted(p.name for p in cache.iterdir()) == [path.name]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", MARKER):
        assert (path / name).is_file(), name
    record = json.loads((path / MARKER).read_text())
    assert record["steps"] == 50 and record["seed"] == 0 and record["size"] == "xs"
    assert 0.0 <= record["heldout_accuracy"] <= 1.0 and record["seconds"] > 0
    assert TinyModelConfig(**record["config"]) == TinyModelConfig(**FAST)


def test_cache_hit_returns_without_training(prepared):
    cache, path = prepared
    records = _Records()
    logger = logging.getLogger("asyncflow.tasks.tiny")
    old_level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        again = prepare_tiny_model(TinyModelConfig(**FAST), cache)
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
    assert again == path
    assert any("cache hit" in m for m in records.messages)
    assert not any("SFT step" in m for m in records.messages), records.messages


def test_cache_name_depends_on_every_field():
    base = TinyModelConfig()
    assert TinyModelConfig().name == base.name
    assert TinyModelConfig(seed=1).name != base.name
    assert TinyModelConfig(lr=3e-3).name != base.name
    assert TinyModelConfig(stop_accuracy=0.3).name != base.name
    assert base.name.startswith("tiny-add3-s-seed0-")


def test_cache_name_ignores_how_rewards_run():
    # the name every prepared cache was made under before the task grew reward-running fields
    assert TinyModelConfig().name == "tiny-add3-s-seed0-15e54f6002"
    task = AdditionConfig(reward_timeout_s=1.0, on_reward_failure="drop_group")
    assert TinyModelConfig(task=task).name == TinyModelConfig().name


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ASYNCFLOW_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ASYNCFLOW_CACHE")
    assert default_cache_dir().name == ".cache"


def test_incomplete_directory_is_refused(tmp_path):
    cfg = TinyModelConfig(**FAST)
    (tmp_path / cfg.name).mkdir()
    with pytest.raises(ValueError, match="without prep.json"):
        prepare_tiny_model(cfg, tmp_path)


def test_unreached_threshold_raises_and_leaves_no_directory(tmp_path):
    cfg = TinyModelConfig(size="xs", eval_every=5, max_steps=10, stop_accuracy=1.0)
    with pytest.raises(SFTError, match="max_steps=10"):
        prepare_tiny_model(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_config_rejects_bad_values_naming_them():
    with pytest.raises(ValueError, match="size='l'"):
        TinyModelConfig(size="l")
    with pytest.raises(ValueError, match="stop_accuracy=1.5"):
        TinyModelConfig(stop_accuracy=1.5)


def test_training_is_deterministic_from_seed():
    tok = build_char_tokenizer()
    cfg = dict(size="xs", eval_every=20, max_steps=20, stop_accuracy=0.0)
    a, _ = train_tiny_model(TinyModelConfig(**cfg), tok)
    b, _ = train_tiny_model(TinyModelConfig(**cfg), tok)
    c, _ = train_tiny_model(TinyModelConfig(**cfg, seed=1), tok)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


STRINGS = ["042+917=", "0959", "1 2+3*(4-5)/6.5=", "", "  ", " 9 "]


def test_tokenizer_agrees_with_transformers(prepared):
    _, path = prepared
    ours = Tokenizer.from_pretrained(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert ours.vocab_size == len(hf) == 22
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id,
                                                       hf.pad_token_id) == (1, 2, 0)
    for s in STRINGS:
        ids = ours.encode(s)
        assert len(ids) == len(s) and ours.decode(ids) == s == hf.decode(ids)
        assert hf.encode(s, add_special_tokens=False) == ids
        assert hf.encode(s) == encode_prompt(ours, s) == [ours.bos_id] + ids
    with_eos = ours.encode("0959") + [ours.eos_id]
    assert ours.decode(with_eos, skip_special_tokens=False) == "0959<eos>" == hf.decode(with_eos)
    assert ours.encode("0959<eos>") == with_eos == hf.encode("0959<eos>", add_special_tokens=False)
    # Characters outside the vocab are dropped by both (Qwen2Tokenizer has no unk token).
    assert ours.encode("1x2") == ours.encode("12") == hf.encode("1x2", add_special_tokens=False)


def test_transformers_greedy_answers_equal_asyncflow(prepared):
    _, path = prepared
    problems = AdditionTask(TinyModelConfig(**FAST).task).heldout_problems()[:64]
    ours_tok = Tokenizer.from_pretrained(path)
    want = greedy_completions(load_pretrained(path), ours_tok, problems)

    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = hf_tok([p.prompt for p in problems], return_tensors="pt")
    P = batch.input_ids.shape[1]
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=5)  # greedy: generation_config.json
    got = split_completions(hf_tok, out[:, P:].tolist(), [hf_tok.eos_token_id])
    assert got == want
    assert len({c for c, _ in want}) > 1  # not a degenerate constant answer
