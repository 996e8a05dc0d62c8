"""Group-relative advantages (GRPO, Dr. GRPO, RLOO) as one re-parameterised function.

Shapes: G groups, N rows per group.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards_GN: torch.Tensor,
    baseline: str = "mean",
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantage of every row against its group.

    baseline "mean": r - mean(group) (GRPO; with normalize_std=False this is Dr. GRPO);
    baseline "loo": r - mean(other rows of the group) (RLOO). normalize_std divides by the group's
    unbiased std + eps. A group holding a non-finite reward (a failed row under
    `on_reward_failure=drop_group`) gets advantage 0 on every row: it carries no gradient. Returns
    advantages [G, N] and metrics (fraction of groups whose rewards are all equal, which carry no
    gradient; dropped groups count as such).
    """
    if rewards_GN.dim() != 2:
        raise ValueError(f"rewards must be [groups, group_size], got shape {list(rewards_GN.shape)}")
    G, N = rewards_GN.shape
    r = rewards_GN.float()
    dropped_G1 = ~torch.isfinite(r).all(dim=1, keepdim=True)
    r = r.masked_fill(dropped_G1, 0.0)  # an all-zero group: advantage 0 on every baseline
    mean_G1 = r.mean(dim=1, keepdim=True)
    if baseline == "mean":
        adv_GN = r - mean_G1
    elif baseline == "loo":
        if N < 2:
            raise ValueError("baseline='loo' needs a group size >= 2")
        adv_GN = (r - mean_G1) * N / (N - 1)  # r - (sum - r) / (N - 1)
    else:
        raise ValueError(f"baseline={baseline!r}; use 'mean' or 'loo'")
    if normalize_std:
        std_G1 = r.std(dim=1, keepdim=True) if N > 1 else torch.zeros_like(mean_G1)
        # an all-equal group has zero advantage whatever eps is (never 0/0)
        adv_GN = torch.where(std_G1 > 0, adv_GN / (std_G1 + eps), torch.zeros_like(adv_GN))
    flat = (r.max(dim=1).values == r.min(dim=1).values).float()
    return adv_GN, {"advantage/zero_std_frac": flat.mean().item()}


def overlong_penalty(lengths_B: torch.Tensor, max_len: int, buffer: int,
                     factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to a row's reward: 0 up to max_len - buffer tokens,
    then falling linearly to -factor at max_len (a response cut at the limit gets -factor).
    buffer 0 disables it."""
    if buffer <= 0:
        return torch.zeros(lengths_B.shape, dtype=torch.float32)
    over_B = (lengths_B.float() - (max_len - buffer)).clamp(min=0.0, max=float(buffer))
    return -factor * over_B / buffer
