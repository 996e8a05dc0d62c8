"""A faulty reward function costs its row (or, under drop_group, its group), never the run: the
reward and advantage stages over a real in-process queue, reading the metrics they return."""

import logging
import math

import pytest
import torch

from asyncflow.pipeline.stages import AdvantageStage, RewardStage, StepShape
from asyncflow.queue import ColumnSpec, Controller, QueueConfig, StageSpec, connect
from asyncflow.tasks.tiny import build_char_tokenizer
from tests.faulty_tasks import ScriptedTask

N = 2  # rows per group; the first completion of a group is right, the second wrong
TIMEOUT_S = 0.5


def _run_step(script: tuple[str, ...], on_failure: str, finished: list[int] | None = None,
              overlong=(0, 0, 0.0), mask_truncated: bool = False):
    """Put one step (a group per problem of `script`), run reward and advantage on it; returns
    the step's metrics, the rewards and advantages by row, and the stage."""
    P = len(script)
    cfg = QueueConfig(
        columns=[ColumnSpec("response_ids", "int64", [8], ragged=True),
                 ColumnSpec("finished", "int64", []), ColumnSpec("uid", "int64", []),
                 ColumnSpec("reward", "float32", []), ColumnSpec("advantage", "float32", [])],
        stages=[StageSpec("reward", ["response_ids", "finished", "uid"]),
                StageSpec("advantage", ["reward", "finished"]),
                StageSpec("train", ["reward", "advantage"])],
        capacity_rows=P * N, group_size=N, rows_per_step=P * N, transport="local", timeout_s=5.0)
    q = connect(cfg, 0, controller=Controller(cfg))
    tok = build_char_tokenizer()
    responses = [torch.tensor(tok.encode(text) + [tok.eos_id]) for _ in script
                 for text in ("0002", "0003")]
    q.put({"response_ids": responses, "finished": torch.tensor(finished or [1] * (P * N)),
           "uid": torch.arange(P).repeat_interleave(N)}, step=0,
          group_ids=[g for g in range(P) for _ in range(N)])
    shape = StepShape(P, N, num_steps=1, max_staleness=0, timeout_s=5.0, chunk_rows=N)
    stage = RewardStage(q, ScriptedTask(script), tok, shape, TIMEOUT_S, on_failure, overlong)
    try:
        metrics = stage.run_step(0)
    finally:
        stage.close()
    metrics.merge(AdvantageStage(q, shape, "mean", normalize_std=True,
                                 mask_truncated=mask_truncated).run_step(0))
    batch = q.get("train", P * N, timeout_s=1.0)
    by_row = {r: i for i, r in enumerate(batch.row_ids)}
    rewards = [batch.columns["reward"][by_row[r]].item() for r in range(P * N)]
    advantages = [batch.columns["advantage"][by_row[r]].item() for r in range(P * N)]
    q.close()
    return metrics.values(0), rewards, advantages


def test_each_faulty_reward_is_a_counted_failure_logged_with_its_row_and_zero_reward(caplog):
    script = ("0002", "hang", "raise", "nan", "string", "exit")
    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        metrics, rewards, advantages = _run_step(script, "zero")
    assert rewards == [1.0, 0.0] + [0.0] * 10
    assert advantages[0] > 0 > advantages[1] and advantages[2:] == [0.0] * 10
    assert metrics["reward/failures"] == 10 and metrics["reward/timeouts"] == 2
    assert metrics["reward/dropped_groups"] == 0
    assert metrics["advantage/flat_group_frac"] == pytest.approx(5 / 6)  # all-zero groups
    assert metrics["reward/mean"] == pytest.approx(1 / 12)
    messages = [r.getMessage() for r in caplog.records]
    reasons = {"hang": "timeout after 0.5 s", "raise": "RuntimeError: sandbox died",
               "nan": "returned nan", "string": "returned str '1.0', not a number",
               "exit": "reward worker died (exit code 3)"}
    for uid, how in enumerate(script[1:], start=1):
        for row in (N * uid, N * uid + 1):
            assert any(f"row {row} (problem {uid}) failed: {reasons[how]}" in m
                       for m in messages), (row, messages)


def test_drop_group_gives_a_failed_rows_group_zero_advantage_and_counts_it():
    metrics, rewards, advantages = _run_step(("0002", "raise", "0002", "nan"), "drop_group")
    assert rewards[:2] == [1.0, 0.0] == rewards[4:6]
    assert all(math.isnan(r) for r in rewards[2:4] + rewards[6:])
    assert advantages[0] > 0 > advantages[1] and advantages[4] > 0 > advantages[5]
    assert advantages[2:4] == [0.0, 0.0] == advantages[6:]
    assert metrics["reward/failures"] == 4 and metrics["reward/timeouts"] == 0
    assert metrics["reward/dropped_groups"] == 2
    assert metrics["advantage/flat_group_frac"] == pytest.approx(0.5)  # a dropped group is flat
    assert metrics["reward/mean"] == pytest.approx(0.5)  # over the rows that have a reward


def test_the_overlong_penalty_shapes_the_reward_by_length():
    # responses are 5 tokens ("0002" + EOS): 1 into a 2-token buffer before a 6-token limit
    metrics, rewards, _ = _run_step(("0002", "0002"), "zero", overlong=(6, 2, 1.0))
    assert rewards == [0.5, -0.5] * 2  # 1.0 - 0.5 for the right answer, 0.0 - 0.5 otherwise
    assert metrics["reward/overlong_penalty"] == pytest.approx(-0.5)
    assert metrics["reward/mean"] == pytest.approx(0.5)  # the task's score, before shaping


def test_mask_truncated_zeroes_the_advantage_of_rows_without_eos():
    finished = [1, 0, 1, 1]  # group 0's wrong row was cut by the token limit
    metrics, _, advantages = _run_step(("0002", "0002"), "zero", finished, mask_truncated=True)
    _, _, unmasked = _run_step(("0002", "0002"), "zero", finished)
    assert advantages[1] == 0.0 and unmasked[1] < 0
    assert advantages[0] == unmasked[0] and advantages[2:] == unmasked[2:]  # the others keep theirs
    assert metrics["advantage/masked_truncated"] == 1
