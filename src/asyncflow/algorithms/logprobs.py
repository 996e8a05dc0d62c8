"""Per-token log-probs and entropy from logits, in fp32, chunked over the batch.

The log-prob of a token is taken under logits / temperature before any top-k/top-p truncation:
the distribution the rollout engine reports, so trainer and engine agree up to numerics.
Shapes: B rows, T positions, V vocabulary.
"""

from __future__ import annotations

import torch


def token_logprobs(logits_BTV: torch.Tensor, ids_BT: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[ids], fp32 [B, T]."""
    logits = logits_BTV.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked_BT = logits.gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1)
    return picked_BT - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, fp32 [B, T]."""
    logp = torch.log_softmax(logits_BTV.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
