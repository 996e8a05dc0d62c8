"""Random tiny checkpoints and reference computations for rollout-engine tests (fp32, CPU).

The checkpoints are saved in HF format, so any engine can serve them (the torch engine, SGLang)
and transformers can load them as the reference. Head dim 16 with grouped-query (Qwen2: 4 query
heads, 2 key/value heads) and multi-query attention (Llama: 1 key/value head). A wider model
(hidden 128) moved a CPU log-prob by 1.2e-5 between batch sizes: the batch-invariance checks'
1e-5 holds at this size, not at every size."""

from __future__ import annotations

import torch

from asyncflow.engines import GenerationRequest, SamplingParams
from asyncflow.models import ModelConfig, build_model, load_pretrained, save_pretrained

VOCAB, EOS = 24, 2
TINY = dict(architectures=["Qwen2ForCausalLM"], vocab_size=VOCAB, hidden_size=64,
            intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64,
            eos_token_id=EOS)
LLAMA = dict(TINY, architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
             num_key_value_heads=1, rope_theta=500.0)


def save_random(tmp_path_factory, name: str, hf: dict, seed: int):
    model = build_model(ModelConfig.from_hf_dict(hf))
    model.init_weights(seed=seed, std=0.3)  # large enough that outputs depend on the prompt
    return save_pretrained(model, tmp_path_factory.mktemp(name))


def random_prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lens]


def make_requests(prompt_ids: list[list[int]], **sampling) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", p, SamplingParams(**sampling))
            for i, p in enumerate(prompt_ids)]


def batch_atol(device: str) -> float:
    """How far a row's fp32 log-probs may move when the rest of the batch changes: on CPU the
    sums run in the same order whatever the batch; cuBLAS picks its kernel (and so the order of
    the sums) by the batch size, which moved one log-prob by 1.4e-5 on an H200."""
    return 1e-5 if device == "cpu" else 1e-4


def full_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """Log-probs of `tokens` after `prompt` from one forward of `model` (on its device), on CPU."""
    ids = torch.tensor([prompt + tokens], device=model.lm_head.weight.device)
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1: -1].float().cpu() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def weights_of(path) -> list[tuple[str, torch.Tensor]]:
    return list(load_pretrained(path).state_dict().items())


def greedy_under(path, prefix: list[int], n: int) -> list[int]:
    """n greedy tokens after `prefix` from full forwards of the checkpoint at `path`."""
    model = load_pretrained(path)
    ids = list(prefix)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prefix):]
