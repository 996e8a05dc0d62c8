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
    drain = DataParallelDrain(q, "reference", None, 0, 1, shape, MICRO, ["x"], streaming=True,
                              resumed=True)
    assert drain.done_rows == ({0: done_rows} if done_rows else {})  # from the queue's count
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


def test_a_checkpoint_taken_mid_rollout_resumes_without_redoing_stored_rows():
    """Rollout puts each finished group at once and acks its batch at the end. A snapshot taken
    in between (the train rank checkpoints while rollout runs ahead, max_staleness >= 1) must not
    hand the put rows to rollout again: their responses are stored, and columns are write-once."""
    import threading

    from asyncflow.engines import SamplingParams
    from asyncflow.engines.base import Completion
    from asyncflow.pipeline.stages import RolloutStage, VersionGate

    P, N = 2, 2
    first_group_put, go_on = threading.Event(), threading.Event()

    class Engine:
        policy_version = 0

        def __init__(self, pause: bool):
            self.pause = pause

        def stream(self, requests):
            for i, r in enumerate(requests):
                if self.pause and i == N:  # the first group is put; the second is not yet
                    first_group_put.set()
                    go_on.wait(10)
                yield Completion(r.request_id, list(r.prompt_ids), [3, 4], [-0.1, -0.2], "stop",
                                 0, 0)

    def queue():
        cfg = QueueConfig(
            columns=[ColumnSpec("prompt_ids", "int64", [16], ragged=True),
                     ColumnSpec("response_ids", "int64", [8], ragged=True),
                     ColumnSpec("behaviour_logprobs", "float32", [8], ragged=True),
                     ColumnSpec("finished", "int64", [])],
            stages=[StageSpec("rollout", ["prompt_ids"]),
                    StageSpec("reward", ["response_ids", "finished"])],
            capacity_rows=3 * P * N, group_size=N, rows_per_step=P * N, transport="local",
            timeout_s=5.0)  # fmt: skip
        return connect(cfg, 0, controller=Controller(cfg))

    def rollout(q, engine):
        shape = StepShape(P, N, num_steps=1, max_staleness=1, timeout_s=5.0, chunk_rows=N)
        return RolloutStage(q, engine, VersionGate(engine, 1), SamplingParams(max_new_tokens=8),
                            shape, seed=1, batch_size=P * N)

    q = queue()
    q.put({"prompt_ids": [torch.tensor([1, 2])] * (P * N)}, step=0,
          group_ids=[g for g in range(P) for _ in range(N)])
    t = threading.Thread(target=rollout(q, Engine(pause=True)).run_step, args=(0,), daemon=True)
    t.start()
    assert first_group_put.wait(10)
    snapshot = q.snapshot()  # what the checkpoint writes as queue.pt
    go_on.set()
    t.join(10)
    assert snapshot["columns"]["response_ids"]["row_ids"] == [0, 1]
    assert snapshot["meta"]["ready_order"]["rollout"] == [2, 3]
    resumed = queue()
    resumed.restore(snapshot)
    rollout(resumed, Engine(pause=False)).run_step(0)  # refused (write-once) before the fix
    batch = resumed.get("reward", 8, timeout_s=0)
    assert sorted(batch.row_ids) == [0, 1, 2, 3]
