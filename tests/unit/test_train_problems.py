"""The per-rank memory of train problems that the graph gives its prompt and reward stages."""

from __future__ import annotations

from types import SimpleNamespace

from asyncflow.config import load_config
from asyncflow.pipeline.graph import train_problems
from asyncflow.pipeline.stages import StepShape
from asyncflow.tasks import AdditionTask


class CountingTask:
    def __init__(self, task):
        self.task, self.calls = task, []

    def train_problem(self, index):
        self.calls.append(index)
        return self.task.train_problem(index)


def _ctx(task, max_staleness: int, prompts_per_step: int):
    """What `train_problems` reads of a RunContext; `shared` makes one object per key."""
    objects: dict = {}

    def shared(key, make):
        if key not in objects:
            objects[key] = make()
        return objects[key]

    return SimpleNamespace(task=task, shared=shared,
                           shape=StepShape(prompts_per_step, 8, 100, max_staleness, 5.0))


def test_both_stages_get_one_memory_of_the_steps_the_queue_can_hold():
    task = AdditionTask(load_config([]).task)
    counting = CountingTask(task)
    ctx = _ctx(counting, max_staleness=1, prompts_per_step=4)
    problems = train_problems(ctx)
    assert train_problems(ctx) is problems  # the reward stage's is the prompt stage's
    kept = (1 + 3) * 4  # eta + 2 steps in the queue, and one more
    first = [problems(i) for i in range(kept)]
    assert first == [task.train_problem(i) for i in range(kept)]
    assert [problems(i) for i in range(kept)] == first and counting.calls == list(range(kept))
    problems(kept)  # one more: the least recently used is forgotten
    problems(0)
    assert counting.calls[-2:] == [kept, 0]
