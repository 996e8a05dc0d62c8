"""The per-rank memory of train problems that the prompt and reward stages share."""

from __future__ import annotations

import threading

from asyncflow.config import load_config
from asyncflow.pipeline.stages import TrainProblems
from asyncflow.tasks import AdditionTask


class CountingTask:
    def __init__(self, task):
        self.task, self.calls = task, []

    def train_problem(self, index):
        self.calls.append(index)
        return self.task.train_problem(index)


def test_remembers_the_last_problems_and_gives_the_tasks_own():
    task = AdditionTask(load_config([]).task)
    counting = CountingTask(task)
    problems = TrainProblems(counting, keep=4)
    first = [problems(i) for i in range(6)]  # 0 and 1 are forgotten, oldest first
    assert first == [task.train_problem(i) for i in range(6)]
    assert [problems(i) for i in (2, 3, 4, 5)] == first[2:]
    assert counting.calls == list(range(6))  # no second call for a kept problem
    assert problems(0) == first[0] and counting.calls[-1] == 0


def test_threads_share_one_memory():
    counting = CountingTask(AdditionTask(load_config([]).task))
    problems = TrainProblems(counting, keep=64)
    out = [None, None]

    def worker(k):
        out[k] = [problems(i).answer for i in range(64)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == out[1] and set(counting.calls) == set(range(64))
    calls = len(counting.calls)
    assert [problems(i).answer for i in range(64)] == out[0] and len(counting.calls) == calls
