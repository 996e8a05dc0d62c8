"""Pack (prompt, response) rows into one right-padded batch for trainer forward passes.

Logits at position t predict token t+1, so everything response-related lives on the T-1
"target" positions: `targets_BT[b, t] = input_ids_BT[b, t+1]` and `response_mask_BT[b, t]` is 1
where that target is a response token. Shapes: B rows, T = longest prompt + response - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncflow.queue.schema import Ragged


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

    def scatter_response(self, values: Ragged | list[torch.Tensor],
                         fill: float = 0.0) -> torch.Tensor:
        """Place per-row response-aligned values (length R_b each) onto the target grid [B, T]."""
        flat = values.values if isinstance(values, Ragged) else torch.cat(values)
        out_BT = torch.full(self.targets_BT.shape, fill, dtype=flat.dtype,
                            device=self.targets_BT.device)
        out_BT[self.response_mask_BT.bool()] = flat.to(out_BT.device)
        return out_BT

    def gather_response(self, grid_BT: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of scatter_response: the response-aligned values of every row."""
        lengths = self.response_mask_BT.sum(-1).tolist()
        return list(grid_BT[self.response_mask_BT.bool()].split(lengths))


def pack(prompts: Ragged | list[torch.Tensor], responses: Ragged | list[torch.Tensor],
         device: str | torch.device = "cpu") -> PackedBatch:
    """Rows given as `Ragged` columns or lists of 1-D tensors; a few tensor ops for the whole
    batch, none per row (a hot path: it runs on every micro-batch of every step)."""
    p, r = (x if isinstance(x, Ragged) else Ragged.from_rows(x, torch.empty(0, dtype=torch.long))
            for x in (prompts, responses))
    if len(p) != len(r) or not len(p):
        raise ValueError(f"pack needs as many prompts as responses (>0), got "
                         f"{len(p)} and {len(r)}")
    P, R = p.lengths, r.lengths
    if bool((P < 1).any()):
        raise ValueError(f"row {int(torch.nonzero(P < 1)[0])}: empty prompt")
    B, lengths = len(p), P + R
    L = int(lengths.max())
    row = torch.arange(B)
    ids_BL = torch.zeros(B, L, dtype=torch.long)
    # token k of the values sits at (its row, k - its row's first value + its row's column 0)
    for part, col0 in ((p, torch.zeros(B, dtype=torch.long)), (r, P)):
        n = part.values.shape[0]
        ids_BL[torch.repeat_interleave(row, part.lengths, output_size=n),
               torch.arange(n) - torch.repeat_interleave(part.offsets[:-1] - col0, part.lengths,
                                                         output_size=n)] = part.values.long()
    mask_BL = (torch.arange(L) < lengths[:, None]).long()
    t = torch.arange(L - 1)
    resp_BT = ((t >= P[:, None] - 1) & (t < (P + R)[:, None] - 1)).long()
    ids_BL, mask_BL, resp_BT = ids_BL.to(device), mask_BL.to(device), resp_BT.to(device)
    return PackedBatch(ids_BL, mask_BL, ids_BL[:, 1:], resp_BT)
