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
