"""A reward function that raises or returns a non-number costs that row, never the run."""

import logging

import torch

from asyncflow.pipeline.stages import RewardStage
from asyncflow.tasks import Problem
from asyncflow.tasks.tiny import build_char_tokenizer


class BrokenTask:
    def __init__(self, result):
        self.result = result

    def train_problem(self, index):
        return Problem(index, "1+1=", "0002")

    def heldout_problems(self):
        return []

    def reward(self, completion, answer, finished):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def _stage(task):
    return RewardStage(q=None, task=task, tokenizer=build_char_tokenizer(), shape=None,
                       recorder=None)


def test_reward_failures_are_counted_per_row_and_logged(caplog):
    tok = build_char_tokenizer()
    response = torch.tensor(tok.encode("0002") + [tok.eos_id])
    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        assert _stage(BrokenTask(RuntimeError("sandbox died"))).score(7, response, True, 3) is None
        assert _stage(BrokenTask(float("nan"))).score(8, response, True, 3) is None
        assert _stage(BrokenTask("yes")).score(9, response, True, 3) is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("row 7 (problem 3) failed: RuntimeError: sandbox died" in m for m in messages)
    assert any("row 8" in m and "nan" in m for m in messages)
    assert any("row 9" in m and "ValueError" in m for m in messages)
    assert _stage(BrokenTask(1.0)).score(10, response, True, 3) == 1.0
