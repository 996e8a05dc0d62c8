"""The engine's sampler: counter-based randomness and inverse-CDF sampling."""

import pytest
import torch

from asyncflow.engines.sampling import SamplingBatch, counter_uniform, sample

M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def test_counter_uniform_is_splitmix64_of_seed_and_counter():
    seeds = [0, 1, 12345, 2**62 - 1]
    counters = [0, 7, 1000, 3]
    got = counter_uniform(torch.tensor(seeds), torch.tensor(counters)).tolist()
    want = [(_splitmix64((_splitmix64(s) + c) & M64) >> 40) / 2**24
            for s, c in zip(seeds, counters, strict=True)]
    assert got == want


def _batch(n, temperature=1.0, top_k=0, top_p=1.0, vocab=5):
    return SamplingBatch(
        temperature_B=torch.full((n,), temperature), greedy_B=torch.zeros(n, dtype=torch.bool),
        top_k_B=torch.full((n,), top_k or vocab), top_p_B=torch.full((n,), top_p),
        seed_B=torch.arange(n), any_sampled=True, any_truncated=bool(top_k or top_p < 1),
        truncated_B=torch.full((n,), bool(top_k or top_p < 1)))


@pytest.mark.parametrize("trunc", [dict(), dict(top_k=3), dict(top_p=0.65)])
def test_sampled_frequencies_follow_the_truncated_distribution(trunc):
    n = 20000
    probs = torch.tensor([0.05, 0.4, 0.0, 0.25, 0.3])
    logits_BV = probs.log().expand(n, 5)
    tokens, logp = sample(logits_BV, _batch(n, **trunc), torch.zeros(n, dtype=torch.long))
    kept = probs.clone()
    if trunc.get("top_k"):
        kept[kept < kept.topk(3).values[-1]] = 0  # 0.4, 0.3, 0.25
    if trunc.get("top_p"):
        kept[[0, 3]] = 0  # 0.4 + 0.3 >= 0.65: the smallest such prefix
    freq = torch.bincount(tokens, minlength=5).float() / n
    assert (freq - kept / kept.sum()).abs().max() < 0.015, freq
    assert torch.allclose(logp, probs.log()[tokens])  # untruncated log-probs


def test_greedy_rows_take_the_argmax_whatever_the_rest_of_the_batch():
    logits_BV = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    params = _batch(6, vocab=11)
    params.greedy_B[::2] = True
    tokens, logp = sample(logits_BV, params, torch.zeros(6, dtype=torch.long))
    assert torch.equal(tokens[::2], logits_BV.argmax(-1)[::2])
    assert torch.allclose(logp, torch.log_softmax(logits_BV, -1).gather(-1, tokens[:, None])[:, 0])
