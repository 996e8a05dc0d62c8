"""The reward worker process: every kind of faulty reward costs its row, never the batch."""

import threading
import time

import pytest

from asyncflow.pipeline.reward_worker import RewardItem, RewardWorker
from asyncflow.tasks import AdditionConfig, AdditionTask
from tests.faulty_tasks import ScriptedTask

TIMEOUT_S = 0.5


def _items(answers: list[str], completion: str = "0002") -> list[RewardItem]:
    return [RewardItem(row, completion, a, True) for row, a in enumerate(answers)]


def test_each_fault_fails_its_row_and_the_rest_of_the_batch_is_scored():
    answers = ["0002", "hang", "0002", "raise", "nan", "inf", "string", "none", "exit", "0003",
               "segfault", "0002"]
    with RewardWorker(ScriptedTask(), TIMEOUT_S) as worker:
        t0 = time.perf_counter()
        out = worker.score(_items(answers))
        elapsed_s = time.perf_counter() - t0
        assert worker.num_starts == 4  # the first, then after the hang, the exit and the segfault
    assert [o.value for o in out] == [1.0, None, 1.0, None, None, None, None, None, None, 0.0,
                                      None, 1.0]
    errors = dict(zip(answers, (o.error for o in out), strict=True))
    assert errors["hang"] == "timeout after 0.5 s"
    assert errors["raise"] == "RuntimeError: sandbox died"
    assert errors["nan"] == "returned nan, not a finite number"
    assert errors["inf"] == "returned inf, not a finite number"
    assert errors["string"] == "returned str '1.0', not a number"
    assert errors["none"] == "returned NoneType None, not a number"
    assert errors["exit"] == "reward worker died (exit code 3)"
    assert errors["segfault"] == "reward worker died (exit code -11)"
    assert [o.timed_out for o in out] == [a == "hang" for a in answers]
    # one timeout plus three restarts, with room for a loaded 2-core machine
    assert elapsed_s < TIMEOUT_S + 3.0, elapsed_s


def test_the_row_that_hangs_or_crashes_is_blamed_not_the_first_unanswered_one():
    # the rows before the fault are scored within one reply window, so their results are still
    # in the worker when it hangs or dies: they must be scored again, and only the faulty row fail
    answers = ["0002", "0003", "0002", "hang", "0002", "0003", "exit", "0002"]
    with RewardWorker(ScriptedTask(), TIMEOUT_S) as worker:
        out = worker.score(_items(answers))
        assert worker.num_starts == 3
    assert [o.value for o in out] == [1.0, 0.0, 1.0, None, 1.0, 0.0, None, 1.0]
    assert [o.timed_out for o in out] == [a == "hang" for a in answers]
    assert out[6].error == "reward worker died (exit code 3)"


def test_a_worker_that_dies_before_it_begins_a_batch_fails_no_row():
    with RewardWorker(ScriptedTask(), TIMEOUT_S) as worker:
        worker.score(_items(["0002"]))  # started and ready
        ready = worker._await_ready

        def die_after_ready():  # killed between the liveness check and reading the batch
            ready()
            if worker.num_starts == 1:
                worker._proc.kill()
                worker._proc.join()

        worker._await_ready = die_after_ready
        out = worker.score(_items(["0002", "0003"]))
        assert worker.num_starts == 2
    assert [(o.value, o.error) for o in out] == [(1.0, None), (0.0, None)]


def test_a_hung_reward_costs_about_the_timeout_and_the_next_batch_is_scored():
    with RewardWorker(ScriptedTask(), TIMEOUT_S) as worker:
        t0 = time.perf_counter()
        out = worker.score(_items(["hang", "hang"]))
        elapsed_s = time.perf_counter() - t0
        assert [o.timed_out for o in out] == [True, True]
        assert 2 * TIMEOUT_S <= elapsed_s < 2 * TIMEOUT_S + 2.0, elapsed_s
        assert [o.value for o in worker.score(_items(["0002", "0003"]))] == [1.0, 0.0]


def test_a_worker_that_died_between_batches_is_replaced_without_failing_a_row():
    with RewardWorker(ScriptedTask(), TIMEOUT_S) as worker:
        worker._proc.kill()  # e.g. the kernel's OOM killer
        worker._proc.join()
        out = worker.score(_items(["0002"]))
        assert [(o.value, o.error) for o in out] == [(1.0, None)]
        assert worker.num_starts == 2


def test_addition_rewards_match_in_process_scoring():
    task = AdditionTask(AdditionConfig())
    problems = [task.train_problem(i) for i in range(64)]
    items = [RewardItem(i, p.answer if i % 3 else "0000", p.answer, i % 5 != 0)
             for i, p in enumerate(problems)]
    with RewardWorker(task, TIMEOUT_S) as worker:
        out = worker.score(items)
    assert [o.value for o in out] == [task.reward(it.completion, it.answer, it.finished)
                                      for it in items]
    assert all(o.error is None for o in out)


class _LockedTask(ScriptedTask):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def test_a_task_that_cannot_be_pickled_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="task _LockedTask cannot be sent to its reward worker"):
        RewardWorker(_LockedTask(), TIMEOUT_S)


def test_an_items_data_reaches_the_reward_and_an_item_without_it_is_scored_as_before():
    from tests.user_rewards import EchoDataTask

    items = [RewardItem(0, "x", "y", True, {"value": 0.25}), RewardItem(1, "x", "y", True),
             RewardItem(2, "x", "y", True, {"value": 3})]
    with RewardWorker(EchoDataTask(), TIMEOUT_S) as worker:
        out = worker.score(items)
    assert [(o.value, o.error) for o in out] == [(0.25, None), (-1.0, None), (3.0, None)]


def test_the_worker_leaves_quietly_when_its_parent_resets_the_pipe(monkeypatch):
    # a parent that exits with unread replies resets the pipe: the worker's recv raises
    # ConnectionResetError, not EOFError; it must end like on EOF, not print a traceback
    from asyncflow.pipeline import reward_worker

    monkeypatch.setattr(reward_worker, "_exit_with_parent", lambda: None)

    class ResetPipe:
        def __init__(self):
            self.sent = []

        def send(self, message):
            self.sent.append(message)

        def recv(self):
            raise ConnectionResetError(104, "Connection reset by peer")

    pipe = ResetPipe()
    reward_worker._serve(pipe, None, [0, 0, 0.0])  # returns instead of raising
    assert pipe.sent[0][0] == "ready"
