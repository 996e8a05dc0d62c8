"""`attention`: on CPU, fewer than CPU_MIN_KEYS keys are padded with masked ones; the result and
the gradients must be those of plain SDPA over the real keys."""

import pytest
import torch
import torch.nn.functional as F

from asyncflow.models.transformer import CPU_MIN_KEYS, attention


@pytest.mark.parametrize("S", [1, 5, CPU_MIN_KEYS - 1, CPU_MIN_KEYS, CPU_MIN_KEYS + 3])
@pytest.mark.parametrize("queries", ["all", "one"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_padded_keys_give_the_same_attention_and_gradients(S, queries, kind):
    g = torch.Generator().manual_seed(S)
    B, H, K, D = 3, 4, 2, 8
    T = S if queries == "all" else 1
    q, k, v = (torch.randn(B, n, t, D, generator=g, dtype=torch.float64, requires_grad=True)
               for n, t in ((H, T), (K, S), (K, S)))
    if queries == "all":  # causal, and the last row's first key hidden from every query
        mask = torch.ones(T, S, dtype=torch.bool).tril().expand(B, 1, T, S).clone()
        mask[-1, :, 1:, 0] = False
    else:  # one query per row, broadcast over the query axis, keys of the first row cut short
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[0, ..., S // 2 + 1:] = False
    if kind == "additive":  # 0 = attend, -inf = hidden
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    got = attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((x * w).sum(), (q, k, v)) for x in (got, want)]
    for a, b in zip(*grads, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
