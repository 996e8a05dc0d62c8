"""A stage's ready index updated a batch at a time (`add_rows`, `remove_rows`) against the same
rows added and removed one at a time: every index, in order. Batches mix steps and interleave
groups, which a put of the pipeline never does but a user's put may."""

from __future__ import annotations

import random
import threading

import pytest

from asyncflow.queue.metadata import RowMeta
from asyncflow.queue.ready import StageState


def _state(group_size: int) -> StageState:
    return StageState(0, "s", 1, threading.Condition(), group_size)


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
                one_by_one.add(r, metas[r])
            ready += batch
        else:
            batch = rng.sample(ready, rng.randint(1, min(len(ready), 40)))
            batched.remove_rows(batch, [metas[r] for r in batch])
            for r in batch:
                _remove_one(one_by_one, r, metas[r])
            ready = [r for r in ready if r not in set(batch)]
        assert _indexes(batched) == _indexes(one_by_one)
    assert _indexes(batched) == ([], {}, {}, [])
