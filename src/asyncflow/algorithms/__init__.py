"""RL algorithms as pure functions over tensors: advantages, policy losses, KL, log-probs.

Nothing here knows about torch.distributed, I/O or config objects beyond its own arguments.
"""

from asyncflow.algorithms.advantages import group_advantages, overlong_penalty
from asyncflow.algorithms.logprobs import entropy_from_logits, token_logprobs
from asyncflow.algorithms.losses import (
    kl_penalty,
    policy_loss,
    rows_with_gradient,
    sequence_weights,
)

__all__ = [
    "entropy_from_logits",
    "group_advantages",
    "kl_penalty",
    "overlong_penalty",
    "policy_loss",
    "rows_with_gradient",
    "sequence_weights",
    "token_logprobs",
]
