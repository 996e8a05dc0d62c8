"""The train stage skips the forward/backward of rows whose advantage is exactly 0 and keeps them in
the step's normaliser. These tests show that this changes nothing: such rows have an exactly zero
gradient, and a step's gradient with the skip equals the gradient over every row.

Bit-for-bit equality of a whole step in fp32 is not a property any implementation can have here:
the weight gradients are GEMMs that reduce over the batch's tokens, and a batch with fewer rows
sums the same non-zero terms in another grouping. So the whole-step check is exact in the sense
that matters (float64, 1e-12) and within fp32 rounding in fp32, and the zero-row check is bitwise.
"""

import pytest
import torch

from asyncflow.algorithms import policy_loss, rows_with_gradient, sequence_weights, token_logprobs
from asyncflow.engines.sequences import pack
from asyncflow.models import ModelConfig, build_model

B = 24


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 24, (int(torch.randint(2, 9, ()).item()),), generator=g)
               for _ in range(B)]
    responses = [torch.randint(0, 24, (int(torch.randint(1, 7, (), generator=g)),), generator=g)
                 for _ in range(B)]
    # behaviour log-probs = trainer's + noise (as from an engine that disagrees a little)
    noise = [0.3 * torch.randn(len(r), generator=g, dtype=torch.float64) for r in responses]
    adv = torch.randn(B, generator=g)
    adv[::3] = 0.0
    adv[1::5] = 0.0
    return prompts, responses, noise, adv


def _model(dtype):
    cfg = ModelConfig.from_hf_dict(dict(
        architectures=["Qwen2ForCausalLM"], vocab_size=24, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, max_position_embeddings=64))
    model = build_model(cfg)
    model.init_weights(seed=1)
    return model.to(dtype)


def _grads(model, rows, keep, normaliser, aggregation="token-mean", **loss_kw):
    """Gradient of the step's mean loss computed over the rows in `keep` only."""
    prompts, responses, noise, adv = rows
    model.zero_grad(set_to_none=True)
    for lo in range(0, len(keep), 8):  # micro-batches of 8 rows, as the train stage streams
        mb = keep[lo:lo + 8]
        batch = pack([prompts[i] for i in mb], [responses[i] for i in mb])
        logits = model(batch.input_ids_BT, attention_mask=batch.attention_mask_BT)
        lp_BT = token_logprobs(logits[:, :-1], batch.targets_BT)
        lp_rows = batch.gather_response(lp_BT.detach())
        behaviour = batch.scatter_response([lp + noise[i].to(lp.dtype)
                                            for lp, i in zip(lp_rows, mb, strict=True)])
        loss, _ = policy_loss(lp_BT, behaviour, adv[mb],
                              sequence_weights(batch.response_mask_BT, aggregation), **loss_kw)
        loss.backward()
    return {n: p.grad.clone() / normaliser for n, p in model.named_parameters()
            if p.grad is not None}


VARIANTS = [dict(), dict(clip_low=0.1, clip_high=0.1), dict(tis_cap=2.0),
            dict(aggregation="seq-mean")]


@pytest.mark.parametrize("variant", VARIANTS, ids=["clip", "tight-clip", "tis", "seq-mean"])
def test_rows_with_zero_advantage_have_exactly_zero_gradient(rows, variant):
    model = _model(torch.float32)
    zero = [i for i in range(B) if rows[3][i] == 0]
    assert zero and set(zero).isdisjoint(rows_with_gradient(rows[3]).tolist())
    grads = _grads(model, rows, zero, 1.0, **variant)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())  # bitwise


@pytest.mark.parametrize("variant", VARIANTS, ids=["clip", "tight-clip", "tis", "seq-mean"])
def test_skipping_zero_advantage_rows_leaves_the_step_gradient_unchanged(rows, variant):
    prompts, responses, _, adv = rows
    every = list(range(B))
    keep = rows_with_gradient(adv).tolist()
    assert 0 < len(keep) < B
    aggregation = variant.get("aggregation", "token-mean")
    # the normaliser counts every row of the step, trained or skipped
    normaliser = sum(len(r) for r in responses) if aggregation == "token-mean" else B
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        model = _model(dtype)
        full = _grads(model, rows, every, normaliser, **variant)
        skipped = _grads(model, rows, keep, normaliser, **variant)
        assert full.keys() == skipped.keys()
        for name in full:
            scale = full[name].abs().max().item()
            assert scale > 0, name
            torch.testing.assert_close(skipped[name], full[name], rtol=rtol, atol=rtol * scale,
                                       msg=lambda m, n=name, d=dtype: f"{n} ({d}): {m}")


def test_a_nonzero_advantage_row_has_a_gradient(rows):
    """The check above would pass vacuously if no row ever had a gradient."""
    model = _model(torch.float32)
    one = rows_with_gradient(rows[3])[:1].tolist()
    grads = _grads(model, rows, one, 1.0)
    assert any(g.abs().max() > 0 for g in grads.values())
