"""Pack (prompt, response) rows for trainer forward passes.

Two layouts with one interface: `batch.logits(model)` gives the logits [B, T, V] that predict
`targets_BT`, and `response_mask_BT` is 1 where that target is a response token.
- `pack`: one right-padded row per sample. Logits at position t predict token t+1, so
  `targets_BT[b, t] = input_ids_BT[b, t+1]`; T = longest prompt + response - 1.
- `pack_shared` (the trainer's): the G samples of a GRPO group repeat one prompt, so the model
  reads each distinct prompt once (`SharedPromptBatch`); T = the longest response. Rows whose
  prompts are all different fall back to `pack`.
Shapes: B rows, G distinct prompts, N tokens of a flat sequence, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncflow.models.transformer import attention, causal_padding_mask
from asyncflow.queue.schema import Ragged


class _ResponseGrid:
    """Response-aligned values on a batch's target grid (`targets_BT`, `response_mask_BT`)."""

    targets_BT: torch.Tensor
    response_mask_BT: torch.Tensor

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


@dataclass
class PackedBatch(_ResponseGrid):
    input_ids_BT: torch.Tensor
    """Prompt + response tokens, right-padded with 0, [B, T+1]."""
    attention_mask_BT: torch.Tensor
    """1 on real tokens, [B, T+1]."""
    targets_BT: torch.Tensor
    """Next token at each position, [B, T]."""
    response_mask_BT: torch.Tensor
    """1 where the target is a response token, [B, T]."""

    def logits(self, model) -> torch.Tensor:
        """[B, T, V]: position t predicts targets_BT[:, t]."""
        return model(self.input_ids_BT, attention_mask=self.attention_mask_BT)[:, :-1]


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


@dataclass
class SharedPromptAttention:
    """Attention of a `SharedPromptBatch`'s flat sequence (an `AttentionLayout` of the model):
    each distinct prompt attends causally to itself; each row's response tokens attend to their
    prompt's keys and causally to their own. Tokens are gathered into padded grids per layer and
    the outputs put back in flat order (prompts first, then responses, as the sequence is)."""

    prompt_index_GP: torch.Tensor
    """Flat position of token t of prompt g (0 on padding), [G, P]."""
    prompt_valid_GP: torch.Tensor
    prompt_mask_G1PP: torch.Tensor
    response_index_BR: torch.Tensor
    """Flat position of input token j of row b's response (0 on padding), [B, R]."""
    response_valid_BR: torch.Tensor
    response_mask_B1R_PR: torch.Tensor
    """What response token j of row b sees: its prompt's P keys, then its own R keys."""
    prompt_of_row_B: torch.Tensor

    def attend(self, q_1HND, k_1KND, v_1KND) -> torch.Tensor:
        q_NHD, k_NKD, v_NKD = (x[0].transpose(0, 1) for x in (q_1HND, k_1KND, v_1KND))
        k_GKPD, v_GKPD = (x[self.prompt_index_GP].transpose(1, 2) for x in (k_NKD, v_NKD))
        out_GHPD = attention(q_NHD[self.prompt_index_GP].transpose(1, 2), k_GKPD, v_GKPD,
                             self.prompt_mask_G1PP)
        flat = [out_GHPD.transpose(1, 2)[self.prompt_valid_GP]]
        if self.response_index_BR.shape[1]:
            idx = self.response_index_BR
            k_BKSD, v_BKSD = (torch.cat([prompt[self.prompt_of_row_B], x[idx].transpose(1, 2)], 2)
                              for prompt, x in ((k_GKPD, k_NKD), (v_GKPD, v_NKD)))
            out_BHRD = attention(q_NHD[idx].transpose(1, 2), k_BKSD, v_BKSD,
                                 self.response_mask_B1R_PR)
            flat.append(out_BHRD.transpose(1, 2)[self.response_valid_BR])
        return torch.cat(flat).transpose(0, 1)[None]


@dataclass
class SharedPromptBatch(_ResponseGrid):
    """Rows packed so that each distinct prompt is read once: one flat sequence [1, N] of every
    distinct prompt, then every row's response without its last token (whose logits predict
    nothing). Target j of row b is response token j; the logits predicting it are those of the
    prompt's last token (j = 0) or of the row's response token j - 1."""

    input_ids_1N: torch.Tensor
    position_ids_1N: torch.Tensor
    layout: SharedPromptAttention
    logit_index_BT: torch.Tensor
    """Flat position whose logits predict targets_BT[b, t] (0 on padding)."""
    targets_BT: torch.Tensor
    response_mask_BT: torch.Tensor

    def logits(self, model) -> torch.Tensor:
        logits_1NV = model(self.input_ids_1N, self.position_ids_1N, attn_mask_B1TS=self.layout)
        return logits_1NV[0, self.logit_index_BT]


def pack_shared(prompts: Ragged | list[torch.Tensor], responses: Ragged | list[torch.Tensor],
                device: str | torch.device = "cpu") -> SharedPromptBatch | PackedBatch:
    """`SharedPromptBatch` of the rows when some repeat a prompt (token for token, wherever they
    sit in the batch), else `pack`. The same log-probs and gradients as `pack` up to float
    rounding, from fewer tokens: the default's 8 samples of a 9-token prompt with up to 6 response
    tokens are 9 + 8 * 5 tokens instead of 8 * 15."""
    p, r = (x if isinstance(x, Ragged) else Ragged.from_rows(x, torch.empty(0, dtype=torch.long))
            for x in (prompts, responses))
    if len(p) != len(r) or not len(p) or bool((p.lengths < 1).any()):
        return pack(p, r, device)  # it says what is wrong
    distinct_GP, prompt_of_row_B = torch.unique(p.padded(-1), dim=0, return_inverse=True)
    G, B = distinct_GP.shape[0], len(p)
    if G == B or not bool((r.lengths > 0).any()):
        return pack(p, r, device)
    P_G = (distinct_GP >= 0).sum(1)
    prompt_valid_GP = torch.arange(distinct_GP.shape[1]) < P_G[:, None]
    num_prompt_tokens = int(P_G.sum())
    prompt_first_G = torch.cumsum(P_G, 0) - P_G
    prompt_index_GP = ((prompt_first_G[:, None] + torch.arange(distinct_GP.shape[1]))
                       * prompt_valid_GP)

    R_B = r.lengths
    inputs_B = (R_B - 1).clamp(min=0)  # the last response token predicts nothing
    R = int(inputs_B.max())
    response_valid_BR = torch.arange(R) < inputs_B[:, None]
    response_first_B = num_prompt_tokens + torch.cumsum(inputs_B, 0) - inputs_B
    response_index_BR = (response_first_B[:, None] + torch.arange(R)) * response_valid_BR
    response_inputs = Ragged.gather(r.values, r.offsets[:-1], inputs_B)

    P_B = P_G[prompt_of_row_B]
    ids_1N = torch.cat([distinct_GP[prompt_valid_GP].long(), response_inputs.values.long()])[None]
    positions_1N = torch.cat([torch.arange(distinct_GP.shape[1]).expand_as(distinct_GP)[
        prompt_valid_GP], (P_B[:, None] + torch.arange(R))[response_valid_BR]])[None]
    prompt_mask_G1PP = causal_padding_mask(prompt_valid_GP, G, distinct_GP.shape[1], "cpu")
    response_mask = torch.cat([
        prompt_valid_GP[prompt_of_row_B][:, None, :].expand(B, R, -1),
        torch.ones(R, R, dtype=torch.bool).tril() & response_valid_BR[:, None, :]], -1)

    T = int(R_B.max())
    target_valid_BT = torch.arange(T) < R_B[:, None]
    logit_index_BT = torch.cat([(prompt_first_G + P_G - 1)[prompt_of_row_B][:, None],
                                response_index_BR], 1) * target_valid_BT  # R = T - 1
    to = {"device": device}
    layout = SharedPromptAttention(
        prompt_index_GP.to(**to), prompt_valid_GP.to(**to), prompt_mask_G1PP.to(**to),
        response_index_BR.to(**to), response_valid_BR.to(**to), response_mask[:, None].to(**to),
        prompt_of_row_B.to(**to))
    return SharedPromptBatch(
        ids_1N.to(**to), positions_1N.to(**to), layout, logit_index_BT.to(**to),
        r.padded(0).long().to(**to), target_valid_BT.long().to(**to))
