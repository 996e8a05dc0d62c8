"""Reward functions and a task that reads `Problem.data`, as a user would write them, for the
reward worker tests. An importable module: a reward worker process imports them."""

from __future__ import annotations

from tests.faulty_tasks import misbehave


def length_match(completion: str, answer: str, data: dict) -> float:
    """1.0 when the completion is as long as the record's `length` field says."""
    return 1.0 if len(completion) == data["meta"]["length"] else 0.0


def contains_answer(completion: str, answer: str, data: dict) -> float:
    return 1.0 if answer in completion else 0.0


def faulty(completion: str, answer: str, data: dict) -> float:
    """Misbehaves as the completion says (`hang`, `raise`, `nan`, ...), else scores 0.5."""
    if completion in ("hang", "raise", "nan", "inf", "string", "none"):
        return misbehave(completion)
    return 0.5


def takes_two(completion: str, answer: str) -> float:
    return 1.0


class EchoDataTask:
    """A task whose reward is the record's `value` field: it sees `data` only if handed it."""

    def reward(self, completion: str, answer: str, finished: bool, data: dict | None = None
               ) -> float:
        return -1.0 if data is None else float(data["value"])
