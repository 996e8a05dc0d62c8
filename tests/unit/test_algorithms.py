"""Algorithm functions against values computed by hand."""

import math

import pytest
import torch

from asyncflow.algorithms import (
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    policy_loss,
    sequence_weights,
    token_logprobs,
)


def test_grpo_advantages_mean_and_std():
    adv, m = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert torch.allclose(adv[0], torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]))
    assert torch.equal(adv[1], torch.zeros(4))  # all-equal group, eps=0: zero, not 0/0
    assert m["advantage/zero_std_frac"] == 0.5


def test_dr_grpo_has_no_std_normalisation():
    adv, _ = group_advantages(torch.tensor([[3.0, 1.0, 2.0]]), normalize_std=False)
    assert torch.allclose(adv, torch.tensor([[1.0, -1.0, 0.0]]))


def test_all_equal_group_with_eps_is_zero_not_nan():
    adv, _ = group_advantages(torch.ones(1, 8))
    assert torch.equal(adv, torch.zeros(1, 8))


def test_rloo_baseline_is_mean_of_the_others():
    adv, _ = group_advantages(torch.tensor([[1.0, 0.0, 0.0]]), baseline="loo", normalize_std=False)
    assert torch.allclose(adv, torch.tensor([[1.0, -0.5, -0.5]]))


@pytest.mark.parametrize("baseline, normalize_std", [("mean", True), ("mean", False),
                                                     ("loo", False)])
def test_a_group_with_a_non_finite_reward_gets_zero_advantage(baseline, normalize_std):
    rewards = torch.tensor([[1.0, math.nan, 0.0], [1.0, 0.0, 0.0], [math.inf, 1.0, 1.0]])
    adv, m = group_advantages(rewards, baseline, normalize_std)
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[2], torch.zeros(3))
    alone, _ = group_advantages(rewards[1:2], baseline, normalize_std)
    assert torch.equal(adv[1], alone[0]) and bool(adv[1].ne(0).all())
    assert m["advantage/zero_std_frac"] == pytest.approx(2 / 3)


def test_advantages_refuse_bad_input():
    with pytest.raises(ValueError, match="groups, group_size"):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="baseline='x'"):
        group_advantages(torch.ones(2, 2), baseline="x")


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probs 1/4, 3/4
    assert torch.allclose(token_logprobs(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]]))
    # temperature 2: logits [0, log3/2] -> probs 1/(1+sqrt3), sqrt3/(1+sqrt3)
    want = math.log(1 / (1 + math.sqrt(3)))
    assert torch.allclose(token_logprobs(logits, torch.tensor([[0]]), 2.0), torch.tensor([[want]]))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert torch.allclose(entropy_from_logits(logits), torch.tensor([[h]]))


def test_sequence_weights():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert torch.equal(sequence_weights(mask, "token-mean"), mask.float())
    assert torch.allclose(sequence_weights(mask, "seq-mean"),
                          torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0], [1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="aggregation='mean'"):
        sequence_weights(mask, "mean")


def test_kl_estimators():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # log r = log 2
    assert torch.allclose(kl_penalty(lp, ref, "k1"), torch.tensor([math.log(2)]))
    assert torch.allclose(kl_penalty(lp, ref, "k2"), torch.tensor([0.5 * math.log(2) ** 2]))
    assert torch.allclose(kl_penalty(lp, ref, "k3"), torch.tensor([0.5 - 1 + math.log(2)]))
    assert kl_penalty(lp, lp, "k3").item() == 0.0


def test_ppo_clip_by_hand():
    # ratios 1.5, 0.5, 1.1 against behaviour; advantages +1, -1 (row 0), +1 (row 1)
    behaviour = torch.log(torch.tensor([[0.2, 0.4], [0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.3, 0.2], [0.55, 0.5]]))
    adv = torch.tensor([1.0, -1.0])
    w = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # last token masked
    loss, sums = policy_loss(logp, behaviour, adv, w, clip_low=0.2, clip_high=0.28)
    # row 0 tok 0: ratio 1.5, A=+1: min(1.5, 1.28) = 1.28 -> -1.28 (clipped)
    # row 0 tok 1: ratio 0.5, A=+1: min(0.5, 0.8) = 0.5 -> -0.5 (not clipped)
    # row 1 tok 0: ratio 1.1, A=-1: min(-1.1, -1.1) -> 1.1 (not clipped)
    assert torch.allclose(loss, torch.tensor(-1.28 - 0.5 + 1.1))
    assert sums["loss/clip_frac"].item() == 1.0
    assert torch.allclose(sums["loss/ratio_mean"], torch.tensor(1.5 + 0.5 + 1.1))


def test_ppo_loss_gradient_is_zero_where_clipped():
    behaviour = torch.log(torch.tensor([[0.2]]))
    logp = torch.log(torch.tensor([[0.3]])).requires_grad_()
    loss, _ = policy_loss(logp, behaviour, torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    assert logp.grad.item() == 0.0


def test_truncated_importance_sampling_with_proximal_policy():
    behaviour = torch.log(torch.tensor([[0.1]]))
    prox = torch.log(torch.tensor([[0.4]]))  # prox / behaviour = 4, capped at 2
    logp = prox.clone()
    loss, sums = policy_loss(logp, behaviour, torch.tensor([1.0]), torch.ones(1, 1),
                             proximal_logprobs_BT=prox, tis_cap=2.0)
    assert torch.allclose(loss, torch.tensor(-2.0))  # ratio 1 vs proximal, weight 2
    assert torch.allclose(sums["loss/is_weight_mean"], torch.tensor(2.0))


def test_kl_term_and_mismatch_metric():
    lp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, sums = policy_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 1),
                             ref_logprobs_BT=ref, kl_coef=0.1, kl_kind="k1")
    assert torch.allclose(loss, torch.tensor(0.1 * math.log(2)))
    assert sums["loss/mismatch_kl"].item() == 0.0
    _, sums = policy_loss(lp, ref, torch.tensor([0.0]), torch.ones(1, 1))
    # behaviour 0.25 vs trainer 0.5: k3 with log r = log(0.5): 2 - 1 + log 0.5
    assert torch.allclose(sums["loss/mismatch_kl"], torch.tensor(1 + math.log(0.5)))


def test_overlong_penalty_is_zero_then_linear_to_the_limit():
    from asyncflow.algorithms import overlong_penalty

    lengths = torch.tensor([10, 12, 14, 16, 20])
    assert overlong_penalty(lengths, 16, 4, 1.0).tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 16, 0).tolist() == [0.0] * 5  # buffer 0: off
