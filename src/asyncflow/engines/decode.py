"""One decode step (one new token per row) as a function over tensors, eager or compiled.

`decode_logprobs` runs the model for T = 1 over rows 0..B-1 of the slot KV cache, writes each
row's new key/value at its own position and returns log_softmax(logits / T) in fp32: everything
that depends on the model, so that `torch.compile` fuses it (RMSNorm, RoPE, SwiGLU, masks, the
softmaxes and the log-probs become a few C++ loops around the matmuls). The engine samples from
the returned log-probs (`sampling.sample_from_logprobs`), so eager and compiled share the sampler
and the log_softmax over the vocabulary is computed once.

`build_decode_step(compile=True)` compiles with the batch dim (B) and the key dim (S) dynamic:
one graph serves every step, every batch size >= 2 (the engine never passes B = 1, which would
specialise and compile a second graph) and every length; weights swapped by pointer
(`StagedWeights.swap`) are graph inputs, so a commit needs no recompilation.

Shape legend: B decode rows, S key positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from asyncflow.engines.kv_cache import DecodeKV
from asyncflow.models.transformer import CausalLM


def decode_logprobs(model: CausalLM, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor],
                    rows_B: torch.Tensor, last_B1: torch.Tensor, pos_B: torch.Tensor,
                    ar_S: torch.Tensor, temperature_B: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits / T) [B, V] fp32 for the token after `last_B1` (at position pos_B);
    ar_S = arange(S) with S = max(pos_B) + 1: keys past a row's own position are masked."""
    # Additive fp32 mask, shared by all layers (0 = attend, -inf = hidden).
    mask_B11S = torch.where(ar_S <= pos_B[:, None], 0.0, float("-inf"))[:, None, None]
    cache = DecodeKV(k_layers, v_layers, rows_B, pos_B, ar_S.shape[0])
    logits_BV = model(last_B1, position_ids=pos_B[:, None], kv_cache=cache,
                      attn_mask_B1TS=mask_B11S)[:, 0]
    return torch.log_softmax(logits_BV.float() / temperature_B[:, None], dim=-1)


def build_decode_step(compile: bool) -> Callable[..., torch.Tensor]:
    """`decode_logprobs`, or it compiled with inductor (dynamic B and S) when `compile`."""
    if not compile:
        return decode_logprobs
    compiled = torch.compile(decode_logprobs, fullgraph=True)

    def step(model, k_layers, v_layers, rows_B, last_B1, pos_B, ar_S, temperature_B):
        for t in (rows_B, last_B1, pos_B, ar_S, temperature_B):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(model, k_layers, v_layers, rows_B, last_B1, pos_B, ar_S, temperature_B)

    return step
