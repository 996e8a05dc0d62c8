"""Tasks whose reward misbehaves on purpose, for the reward-isolation tests.

They live in an importable module (not in a test function) because a reward worker process has
to unpickle them.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass

from asyncflow.tasks import AdditionConfig, AdditionTask, Problem, TaskConfig

FAULTS_BY_NAME = ("hang", "raise", "nan", "inf", "string", "none", "exit", "segfault")


def misbehave(how: str):
    """Misbehave the way `how` (one of FAULTS_BY_NAME) names."""
    if how == "hang":
        while True:
            time.sleep(60)
    if how == "raise":
        raise RuntimeError("sandbox died")
    if how == "nan":
        return float("nan")
    if how == "inf":
        return float("inf")
    if how == "string":
        return "1.0"
    if how == "exit":
        os._exit(3)
    if how == "segfault":
        ctypes.string_at(0)
    assert how == "none", how
    return None


class ScriptedTask:
    """Train problem i has answer `script[i]`; an answer in FAULTS_BY_NAME makes the reward do
    that, any other answer is scored exactly (1.0 iff completion == answer and EOS)."""

    def __init__(self, script: tuple[str, ...] = ("0002",)):
        self.script = script

    def train_problem(self, index: int) -> Problem:
        return Problem(index, "1+1=", self.script[index])

    def heldout_problems(self) -> list[Problem]:
        return []

    def reward(self, completion: str, answer: str, finished: bool):
        if answer in FAULTS_BY_NAME:
            return misbehave(answer)
        return 1.0 if finished and completion == answer else 0.0


# Addition whose reward misbehaves by the answer's last digit (a pure function of the problem, so
# runs are deterministic): with seed 0 the first 32 train problems (4 steps of 8) include each
# fault at least once, and so do the first 32 held-out problems but `nan`. Other answers get the
# true addition reward.
FAULTS = {"7": "hang", "3": "raise", "6": "nan", "9": "string"}


@dataclass
class FaultyAdditionConfig(TaskConfig):
    """Addition whose reward hangs, raises, or returns NaN or a string for some answers. Not an
    `AdditionConfig`, so runs use the cached tiny model of plain addition."""

    kind: str = "faulty_addition"
    """Task kind; always `faulty_addition` for this config."""
    num_digits: int = 3
    """Operand width, as in `AdditionConfig`."""


class FaultyAdditionTask(AdditionTask):
    """`AdditionTask` with the faults of `FAULTS` in its reward."""

    def __init__(self, cfg: FaultyAdditionConfig):
        super().__init__(AdditionConfig(seed=cfg.seed, num_digits=cfg.num_digits))

    def reward(self, completion: str, answer: str, finished: bool):
        how = FAULTS.get(answer[-1], "ok")
        if how != "ok":
            return misbehave(how)
        return super().reward(completion, answer, finished)
