"""A resumed data-parallel drain skips the rounds its stage finished before the checkpoint, and
finishes a step whose round was cut in half (a crash between two ranks' acks) with every
remaining row exactly once."""

import pytest
import torch

from asyncflow.pipeline.stages import StepShape
from asyncflow.pipeline.trainer import DataParallelDrain
from asyncflow.queue import ColumnSpec, Controller, QueueConfig, StageSpec, connect

P, N, MICRO = 4, 2, 4  # 4 groups of 2 rows a step; rounds of 2 groups: [0, 2) and [2, 4)


def _queue():
    cfg = QueueConfig(columns=[ColumnSpec("x", "int64", [])],
                      stages=[StageSpec("reference", ["x"])], capacity_rows=P * N,
                      group_size=N, rows_per_step=P * N, transport="local", timeout_s=2.0)
    q = connect(cfg, 0, controller=Controller(cfg))
    rows = q.put({"x": torch.arange(P * N)}, step=0,
                 group_ids=[g for g in range(P) for _ in range(N)])
    return q, rows


def _drain(q, done_rows):
    shape = StepShape(P, N, num_steps=1, max_staleness=0, timeout_s=2.0, chunk_rows=MICRO)
    drain = DataParallelDrain(q, "reference", None, 0, 1, shape, MICRO, ["x"], streaming=True)
    drain.done_rows = {0: done_rows}
    seen = []
    for batch in drain(0):
        seen.append(batch.row_ids)
        q.ack(batch)
    return seen


@pytest.mark.parametrize("consumed", [0, 4, 8])
def test_rounds_finished_before_the_checkpoint_are_skipped(consumed):
    q, rows = _queue()
    if consumed:
        q.ack(q.get("reference", consumed, timeout_s=0))  # rows 0.. in group order
    seen = _drain(q, consumed)
    assert seen == [rows[i:i + MICRO] for i in range(consumed, P * N, MICRO)]


def test_a_half_consumed_round_is_finished_with_the_remaining_rows_once():
    q, rows = _queue()
    q.ack(q.get("reference", 3, timeout_s=0))  # one rank acked its part of round 0, one did not
    seen = _drain(q, 3)
    flat = [r for b in seen for r in b]
    assert sorted(flat) == rows[3:] and len(flat) == len(set(flat))
