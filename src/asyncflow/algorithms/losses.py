"""PPO-clip policy loss against behaviour log-probs, with KL penalties; pure functions.

The loss of a micro-batch is returned as a SUM of per-token terms times per-token weights, never a
mean: the train stage divides once per step by the all-reduced normaliser (tokens for
"token-mean", sequences for "seq-mean"), which makes micro-batch streaming equal to the full
batch exactly. `sequence_weights` builds those per-token weights.
Shapes: B rows, T response positions.
"""

from __future__ import annotations

import torch


def sequence_weights(mask_BT: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Per-token weights whose sum over a step, divided by the step's normaliser, is the mean.

    token-mean: weight 1 per valid token (normaliser: valid tokens in the step).
    seq-mean:   weight 1/len(row) per valid token (normaliser: rows in the step).
    """
    mask = mask_BT.float()
    if aggregation == "token-mean":
        return mask
    if aggregation == "seq-mean":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1)
    raise ValueError(f"aggregation={aggregation!r}; use 'token-mean' or 'seq-mean'")


def rows_with_gradient(advantages_B: torch.Tensor) -> torch.Tensor:
    """Rows whose `policy_loss` term can have a non-zero gradient (without a KL term).

    A row with advantage exactly 0 contributes -min(r * 0, clip(r) * 0) * w = 0 at every token,
    whatever its ratio r or importance weight, so its gradient is exactly zero: the train stage
    skips its forward/backward and still counts it in the step's normaliser, which leaves the
    step's gradient the same up to float summation order.
    """
    return torch.nonzero(advantages_B != 0).flatten()  # int64 row indexes


def kl_penalty(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1: log r; k2: (log r)^2 / 2; k3 (low variance): exp(-log r) - 1 + log r, with
    log r = logp - ref_logp.
    """
    log_ratio = logprobs_BT - ref_logprobs_BT
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl kind={kind!r}; use 'k1', 'k2' or 'k3'")


def policy_loss(
    logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    weights_BT: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    tis_cap: float | None = None,
    proximal_logprobs_BT: torch.Tensor | None = None,
    ref_logprobs_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted SUM of the PPO-clip objective (negated, to minimise) and sums for metrics.

    The ratio is taken against `proximal_logprobs_BT` when given (decoupled objective), else
    against the behaviour policy that generated the tokens. With a proximal policy, or with
    `tis_cap`, the behaviour mismatch is corrected by a truncated importance weight
    min(exp(prox - behaviour), tis_cap) (no gradient). DAPO's clip-higher is clip_high > clip_low.
    Returned metric sums use the same weights, so dividing by the step's normaliser gives means.
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low={clip_low}, clip_high={clip_high}: both must be >= 0")
    anchor_BT = behaviour_logprobs_BT if proximal_logprobs_BT is None else proximal_logprobs_BT
    ratio_BT = torch.exp(logprobs_BT - anchor_BT)
    adv_BT = advantages_B.float().unsqueeze(-1).expand_as(ratio_BT)
    unclipped = ratio_BT * adv_BT
    clipped = ratio_BT.clamp(1 - clip_low, 1 + clip_high) * adv_BT
    per_token = -torch.minimum(unclipped, clipped)
    is_weight_BT = torch.ones_like(ratio_BT)
    if proximal_logprobs_BT is not None or tis_cap is not None:
        is_weight_BT = torch.exp(anchor_BT - behaviour_logprobs_BT).detach()
        if tis_cap is not None:
            is_weight_BT = is_weight_BT.clamp(max=tis_cap)
        per_token = per_token * is_weight_BT
    if ref_logprobs_BT is not None and kl_coef != 0.0:
        kl_BT = kl_penalty(logprobs_BT, ref_logprobs_BT, kl_kind)
        per_token = per_token + kl_coef * kl_BT
    else:
        kl_BT = None
    w = weights_BT.float()
    loss = (per_token * w).sum()
    with torch.no_grad():
        clipped_mask = (clipped < unclipped).float()  # the clip bound was active
        mismatch_BT = behaviour_logprobs_BT - logprobs_BT
        sums = {
            "loss/clip_frac": (clipped_mask * w).sum(),
            "loss/ratio_mean": (ratio_BT * w).sum(),
            # k3 estimate of KL(behaviour || trainer) from the behaviour samples
            "loss/mismatch_kl": ((torch.expm1(-mismatch_BT) + mismatch_BT) * w).sum(),
            "loss/is_weight_mean": (is_weight_BT * w).sum(),
        }
        if kl_BT is not None:
            sums["loss/kl"] = (kl_BT * w).sum()
    return loss, sums
