"""A stage's ready index updated a batch at a time (`add_rows`, `add_front`, `remove_rows`) against
the same rows added and removed one at a time: every index, in order. Batches mix steps and
interleave groups, which a put of the pipeline never does but a user's put may."""

from __future__ import annotations

import random
import threading

import pytest

from asyncflow.queue.metadata import RowMeta
from asyncflow.queue.ready import StageState


def _state(group_size: int) -> StageState:
    return StageState(0, "s", 1, threading.Condition(), group_size)


def _add_one(st: StageState, rid: int, meta: RowMeta, front: bool = False) -> None:
    """What offering one row means, written out: last, or first (a row given back)."""
    def put(index: dict, key: int) -> None:
        if front:
            rest = dict(index)
            index.clear()
            index[key] = None
            index.update(rest)
        else:
            index[key] = None

    put(st.ready, rid)
    put(st.by_step.setdefault(meta.step, {}), rid)
    if st.group_size > 1:
        st.group_ready[meta.group_id] = st.group_ready.get(meta.group_id, 0) + 1
        if st.group_ready[meta.group_id] == st.group_size:
            put(st.complete_groups, meta.group_id)


def _remove_one(st: StageState, rid: int, meta: RowMeta) -> None:
    """What removing one row means, written out."""
    del st.ready[rid]
    del st.by_step[meta.step][rid]
    if not st.by_step[meta.step]:
        del st.by_step[meta.step]
    if st.group_size > 1:
        st.complete_groups.pop(meta.group_id, None)
        st.group_ready[meta.group_id] -= 1
        if not st.group_ready[meta.group_id]:
            del st.group_ready[meta.group_id]


def _indexes(st: StageState):
    return (list(st.ready), {s: list(b) for s, b in st.by_step.items()}, dict(st.group_ready),
            list(st.complete_groups))


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_batched_updates_equal_row_by_row_updates(group_size):
    rng = random.Random(group_size)
    batched, one_by_one = _state(group_size), _state(group_size)
    metas: dict[int, RowMeta] = {}
    for rid in range(400):  # 100 groups over 5 steps, added in shuffled batches
        metas[rid] = RowMeta(step=rid // 80, group_id=rid // group_size)
    waiting = list(metas)
    rng.shuffle(waiting)
    ready: list[int] = []
    while waiting or ready:
        if waiting and (not ready or rng.random() < 0.6):
            batch = waiting[:rng.randint(1, 40)]
            waiting = waiting[len(batch):]
            batched.add_rows(batch, [metas[r] for r in batch])
            for r in batch:
                _add_one(one_by_one, r, metas[r])
            ready += batch
        else:
            batch = rng.sample(ready, rng.randint(1, min(len(ready), 40)))
            batched.remove_rows(batch, [metas[r] for r in batch])
            for r in batch:
                _remove_one(one_by_one, r, metas[r])
            ready = [r for r in ready if r not in set(batch)]
        assert _indexes(batched) == _indexes(one_by_one)
    assert _indexes(batched) == ([], {}, {}, [])


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_rows_given_back_go_first_as_row_by_row(group_size):
    """`add_front` (a lease given back) equals putting each row first, from the last to the
    first, whether the rows complete their groups or join rows of their group still ready."""
    rng = random.Random(10 + group_size)
    batched, one_by_one = _state(group_size), _state(group_size)
    metas = {rid: RowMeta(step=rid // 40, group_id=rid // group_size) for rid in range(120)}
    order = list(metas)
    rng.shuffle(order)
    first, back = order[:50], order[50:]
    batched.add_rows(first, [metas[r] for r in first])
    for r in first:
        _add_one(one_by_one, r, metas[r])
    for lo in range(0, len(back), 23):  # several leases given back in turn
        lease = back[lo:lo + 23]
        batched.add_front(lease, [metas[r] for r in lease])
        for r in reversed(lease):
            _add_one(one_by_one, r, metas[r], front=True)
        assert _indexes(batched) == _indexes(one_by_one)
    assert list(batched.ready)[:len(back) % 23 or 23] == back[-(len(back) % 23 or 23):]
