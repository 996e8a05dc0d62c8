"""Pack (prompt, response) rows into one right-padded batch for trainer forward passes.

Logits at position t predict token t+1, so everything response-related lives on the T-1
"target" positions: `targets_BT[b, t] = input_ids_BT[b, t+1]` and `response_mask_BT[b, t]` is 1
where that target is a response token. Shapes: B rows, T = longest prompt + response - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids_BT: torch.Tensor
    """Prompt + response tokens, right-padded with 0, [B, T+1]."""
    attention_mask_BT: torch.Tensor
    """1 on real tokens, [B, T+1]."""
    targets_BT: torch.Tensor
    """Next token at each position, [B, T]."""
    response_mask_BT: torch.Tensor
    """1 where the target is a response token, [B, T]."""

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask_BT.sum())

    def scatter_response(self, values: list[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """Place per-row response-aligned values (length R_b each) onto the target grid [B, T]."""
        out_BT = torch.full(self.targets_BT.shape, fill, dtype=values[0].dtype,
                            device=self.targets_BT.device)
        out_BT[self.response_mask_BT.bool()] = torch.cat(values).to(out_BT.device)
        return out_BT

    def gather_response(self, grid_BT: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of scatter_response: the response-aligned values of every row."""
        lengths = self.response_mask_BT.sum(-1).tolist()
        return list(grid_BT[self.response_mask_BT.bool()].split(lengths))


def pack(prompts: list[torch.Tensor], responses: list[torch.Tensor],
         device: str | torch.device = "cpu") -> PackedBatch:
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"pack needs as many prompts as responses (>0), got "
                         f"{len(prompts)} and {len(responses)}")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    B, L = len(prompts), max(lengths)
    ids_BL = torch.zeros(B, L, dtype=torch.long)
    mask_BL = torch.zeros(B, L, dtype=torch.long)
    resp_BT = torch.zeros(B, L - 1, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        P, R = len(p), len(r)
        if P < 1:
            raise ValueError(f"row {b}: empty prompt")
        ids_BL[b, :P] = p
        ids_BL[b, P:P + R] = r
        mask_BL[b, :P + R] = 1
        resp_BT[b, P - 1:P - 1 + R] = 1
    ids_BL, mask_BL, resp_BT = ids_BL.to(device), mask_BL.to(device), resp_BT.to(device)
    return PackedBatch(ids_BL, mask_BL, ids_BL[:, 1:], resp_BT)
