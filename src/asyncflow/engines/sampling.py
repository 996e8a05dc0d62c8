"""Batched sampling with per-row parameters and batch-independent randomness.

Each row draws ONE uniform per token from a counter-based hash of (request seed, token index)
(splitmix64), and samples by inverse CDF. No generator state is shared between rows, so a seeded
request samples the same tokens whatever else is in the batch, and the whole batch needs a handful
of vectorised ops per step instead of one `multinomial` per request.

Log-probs are log_softmax(logits / T) in fp32 at the chosen token, before top-k / top-p
truncation: the distribution the trainer evaluates. Greedy rows (T = 0) report the T = 1 log-prob.

Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M64 = 1 << 64


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (products wrap mod 2**64)."""
    return c - _M64 if c >= 1 << 63 else c


_GOLDEN, _C1, _C2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _lsr(x, 30)) * _C1
    x = (x ^ _lsr(x, 27)) * _C2
    return x ^ _lsr(x, 31)


def counter_uniform(seed_B: torch.Tensor, counter_B: torch.Tensor) -> torch.Tensor:
    """float32 [B] in [0, 1) on a 2**-24 grid, a pure function of (seed, counter) (int64)."""
    bits = _lsr(_splitmix64(_splitmix64(seed_B) + counter_B), 40)
    return bits.to(torch.float32) * (1.0 / (1 << 24))


def _inverse_cdf(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i]: never a zero-probability token."""
    cdf_BV = probs_BV.cumsum(-1)
    total_B1 = cdf_BV[:, -1:]
    x_B1 = torch.minimum(u_B[:, None] * total_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1)))
    return torch.searchsorted(cdf_BV, x_B1, right=True).squeeze(1)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of the rows being decoded, kept on the model's device."""

    temperature_B: torch.Tensor
    """float32; 1.0 for greedy rows (their log-probs use T = 1)."""
    greedy_B: torch.Tensor
    """bool."""
    top_k_B: torch.Tensor
    """int64; V when disabled."""
    top_p_B: torch.Tensor
    """float32; 1.0 when disabled."""
    seed_B: torch.Tensor
    """int64."""
    any_sampled: bool
    """Some row samples (skip the CDF work when all are greedy)."""
    any_truncated: bool
    """Some sampled row uses top-k or top-p."""
    truncated_B: torch.Tensor
    """bool: row samples with top-k or top-p."""


def sample(logits_BV: torch.Tensor, params: SamplingBatch,
           counter_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token ids [B] (int64) and their log-probs [B] (fp32); counter_B is the token index."""
    logp_BV = torch.log_softmax(logits_BV.float() / params.temperature_B[:, None], dim=-1)
    return sample_from_logprobs(logp_BV, params, counter_B)


def sample_from_logprobs(logp_BV: torch.Tensor, params: SamplingBatch,
                         counter_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` given log_softmax(logits / temperature) [B, V] fp32 (computed once, by the
    caller: the decode step fuses it into the model's forward)."""
    tokens_B = logp_BV.argmax(-1)
    if params.any_sampled:
        u_B = counter_uniform(params.seed_B, counter_B)
        probs_BV = logp_BV.exp()
        sampled_B = _inverse_cdf(probs_BV, u_B)
        if params.any_truncated:
            rows = params.truncated_B.nonzero().squeeze(1)
            sampled_B[rows] = _truncated(probs_BV[rows], u_B[rows], params.top_k_B[rows],
                                         params.top_p_B[rows])
        tokens_B = torch.where(params.greedy_B, tokens_B, sampled_B)
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None]).squeeze(1)


def _truncated(probs_BV, u_B, top_k_B, top_p_B) -> torch.Tensor:
    """Sample within the top-k tokens and the smallest prefix holding top_p of the mass."""
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    rank_V = torch.arange(probs_BV.shape[-1], device=probs_BV.device)
    before_BV = sorted_BV.cumsum(-1) - sorted_BV  # mass strictly ahead of each token
    keep_BV = (rank_V < top_k_B[:, None]) & (before_BV < top_p_B[:, None])
    j_B = _inverse_cdf(sorted_BV * keep_BV, u_B)
    return order_BV.gather(-1, j_B[:, None]).squeeze(1)
