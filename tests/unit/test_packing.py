"""Batch packing and ragged row selection, against per-row reference constructions.

`pack`, `Ragged.take` and the storage's ragged reads work on whole batches with index arithmetic
(no per-row tensors), so each is checked against the obvious per-row loop on random shapes,
including empty responses, one-token prompts and rows in shuffled order.
"""

from __future__ import annotations

import random

import pytest
import torch

from asyncflow.engines.sequences import pack
from asyncflow.queue import ColumnSpec, Ragged
from asyncflow.queue.schema import Schema
from asyncflow.queue.storage import MemoryStorage


def _reference_pack(prompts: list[torch.Tensor], responses: list[torch.Tensor]):
    """Right-padded ids, attention mask and response mask, one row at a time."""
    B, L = len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    ids, mask, resp = (torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long),
                       torch.zeros(B, L - 1, dtype=torch.long))
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[b, :len(p) + len(r)] = torch.cat([p, r])
        mask[b, :len(p) + len(r)] = 1
        resp[b, len(p) - 1:len(p) - 1 + len(r)] = 1
    return ids, mask, resp


def _random_rows(rng: random.Random, B: int):
    prompts = [torch.tensor([rng.randrange(1, 50) for _ in range(rng.randint(1, 9))])
               for _ in range(B)]
    responses = [torch.tensor([rng.randrange(1, 50) for _ in range(rng.randint(0, 6))],
                              dtype=torch.long) for _ in range(B)]
    return prompts, responses


def _ragged(rows: list[torch.Tensor]) -> Ragged:
    return Ragged.from_lists([r.tolist() for r in rows], torch.long)


@pytest.mark.parametrize("B", [1, 2, 17, 128])
def test_pack_matches_the_per_row_layout(B):
    rng = random.Random(B)
    for _ in range(5):
        prompts, responses = _random_rows(rng, B)
        if not any(len(r) for r in responses):
            responses[0] = torch.tensor([7])
        ids, mask, resp = _reference_pack(prompts, responses)
        for batch in (pack(prompts, responses), pack(_ragged(prompts), _ragged(responses))):
            assert torch.equal(batch.input_ids_BT, ids)
            assert torch.equal(batch.attention_mask_BT, mask)
            assert torch.equal(batch.response_mask_BT, resp)
            assert torch.equal(batch.targets_BT, ids[:, 1:])
            assert batch.num_response_tokens == sum(len(r) for r in responses)
            values = [torch.randn(len(r)) for r in responses]
            grid = batch.scatter_response(values)
            assert all(torch.equal(a, b) for a, b in
                       zip(batch.gather_response(grid), values, strict=True))


def test_pack_refuses_an_empty_prompt_and_mismatched_rows():
    with pytest.raises(ValueError, match="row 1: empty prompt"):
        pack([torch.tensor([1]), torch.tensor([], dtype=torch.long)],
             [torch.tensor([2]), torch.tensor([3])])
    with pytest.raises(ValueError, match="as many prompts as responses"):
        pack([torch.tensor([1])], [])


def test_ragged_take_selects_rows_in_the_given_order():
    rng = random.Random(0)
    rows = [torch.tensor([rng.random() for _ in range(rng.randint(0, 5))]) for _ in range(40)]
    r = Ragged.from_lengths(torch.cat(rows), torch.tensor([len(x) for x in rows]))
    for pick in ([], [3], list(range(40)), rng.sample(range(40), 25), [5, 5, 0]):
        got = r.take(pick)
        assert len(got) == len(pick)
        assert all(torch.equal(a, rows[i]) for a, i in zip(got.rows(), pick, strict=True))


def test_storage_reads_ragged_rows_of_several_puts_in_any_order():
    spec = ColumnSpec("ids", "int64", [6], ragged=True)
    store = MemoryStorage(Schema([spec]))
    rng = random.Random(1)
    want = {}
    for put in range(4):  # rows of a put are stored out of row-id order, as a rollout's are
        ids = rng.sample(range(put * 10, put * 10 + 10), 10)
        rows = [[rng.randrange(100) for _ in range(rng.randint(0, 6))] for _ in ids]
        store.write(ids, {"ids": Ragged.from_lists(rows, torch.long)})
        want.update(zip(ids, rows, strict=True))
    for slots in (sorted(want), rng.sample(sorted(want), 30), [12, 3, 13, 4], [7]):
        got = store.read("ids", slots)
        assert [x.tolist() for x in got.rows()] == [want[s] for s in slots]


def _grouped_rows(rng: random.Random, groups: int, group_size: int):
    """`groups` prompts of 1-9 tokens, each repeated by `group_size` rows with their own responses
    (0-7 tokens), the rows shuffled; one more row with a prompt of its own."""
    distinct = [torch.tensor([rng.randrange(1, 24) for _ in range(rng.randint(1, 9))])
                for _ in range(groups + 1)]
    prompts = [distinct[i // group_size] for i in range(groups * group_size)] + [distinct[-1]]
    responses = [torch.tensor([rng.randrange(1, 24) for _ in range(rng.randint(0, 7))],
                              dtype=torch.long) for _ in prompts]
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [responses[i] for i in order]


def _small_model():
    from asyncflow.models import ModelConfig, build_model
    from tests.engines import TINY

    model = build_model(ModelConfig.from_hf_dict(TINY))
    model.init_weights(seed=3, std=0.3)  # large enough that outputs depend on the prompt
    return model.double()


@pytest.mark.parametrize("groups,group_size", [(1, 2), (3, 4), (6, 8)])
def test_shared_prompts_give_the_log_probs_and_gradients_of_pack(groups, group_size):
    """In float64 a wrong position, mask or gather shows as a relative difference of 1e-3 or more.
    The layouts differ only in summation order, and the model computes its norms and the
    log-softmax in fp32: log-probs agree to 1e-12, gradients to about 1e-8 of their largest."""
    from asyncflow.algorithms import token_logprobs
    from asyncflow.engines.sequences import SharedPromptBatch, pack_shared

    model = _small_model()
    rng = random.Random(groups)
    prompts, responses = _grouped_rows(rng, groups, group_size)
    weights = [torch.randn(len(r), dtype=torch.float64) for r in responses]
    out = {}
    for name, batch in (("pack", pack(prompts, responses)),
                        ("shared", pack_shared(_ragged(prompts), _ragged(responses)))):
        model.zero_grad(set_to_none=True)
        lp_BT = token_logprobs(batch.logits(model), batch.targets_BT)
        assert torch.equal(batch.scatter_response(responses).long(), batch.targets_BT
                           * batch.response_mask_BT)
        (lp_BT * batch.scatter_response(weights)).sum().backward()
        out[name] = (batch, batch.gather_response(lp_BT.detach()),
                     [p.grad.clone() for p in model.parameters()])
    shared = out["shared"][0]
    assert isinstance(shared, SharedPromptBatch)
    distinct = {tuple(p.tolist()) for p in prompts}
    assert shared.input_ids_1N.shape[1] == (sum(len(p) for p in distinct)
                                             + sum(max(len(r) - 1, 0) for r in responses))
    assert shared.num_response_tokens == sum(len(r) for r in responses)
    for a, b in zip(out["pack"][1], out["shared"][1], strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12)
    for a, b in zip(out["pack"][2], out["shared"][2], strict=True):
        assert (a - b).abs().max() <= 1e-6 * a.abs().max()


def test_pack_shared_packs_rows_of_distinct_prompts_as_pack_does():
    from asyncflow.engines.sequences import PackedBatch, pack_shared

    prompts, responses = _random_rows(random.Random(5), 6)
    prompts = [torch.cat([torch.tensor([i + 1]), p]) for i, p in enumerate(prompts)]
    batch = pack_shared(prompts, responses)
    assert isinstance(batch, PackedBatch)
    assert torch.equal(batch.input_ids_BT, pack(prompts, responses).input_ids_BT)
