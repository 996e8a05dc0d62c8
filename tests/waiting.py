"""Bounded waits for tests: a condition that never comes fails the test in seconds, with what was
awaited, instead of hanging it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout_s: float = 5.0, what: str = "",
               poll_s: float = 0.001) -> None:  # fmt: skip
    """Return once `predicate()` is true; TimeoutError after `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:g} s: {what or predicate}")
        time.sleep(poll_s)


def num_waiting(cond: threading.Condition) -> int:
    """Threads parked in `cond.wait()` (CPython's Condition keeps them in `_waiters`)."""
    return len(cond._waiters)  # type: ignore[attr-defined]

