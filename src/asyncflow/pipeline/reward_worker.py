"""Reward functions run in a child process, one call at a time, each under a timeout.

```
 rank process (one caller thread)                   worker process (holds the task)
   score(items) --(seq, [(completion, answer, finished, data)])--> for each item, in order:
                                                       progress := (seq, position, start time)
                                                       task.reward(completion, answer, finished
                                                                   [, data when not None])
                <--- (seq, [(value, error, parts), ...]) every FLUSH_S and at the end of the batch
   the row in progress runs past its start + timeout_s -> that row: "timeout after X s"; SIGKILL
                                the worker, start a new one, send it the rows not answered yet
   EOF (the worker died)     -> the row in progress: "reward worker died (exit code N)"; same
                                restart (a worker that died before it began the batch: no row)
```

Why a process: a reward that hangs, or kills its interpreter (os._exit, a segfault in an extension),
must cost one row, not the run. Why the forkserver start method: the rank process is multi-threaded
(gloo, queue and stage threads) and fork() of a multi-threaded process can leave the child stuck on
a lock another thread held; spawn would re-import torch for every restart. The forkserver is one
single-threaded process, started once per rank process by fork+exec with the task's module and the
main module's imports preloaded; each worker is a fork of it. A worker exits when the rank process
dies, so a hung reward does not outlive a run.

Why replies in batches with a shared progress record: one pipe message per row cost the rank
process a wake-up, a poll and an unpickle per row, on the rollout rank's CPU and GIL. The worker
writes which row it is scoring, and since when, into three shared doubles before each call, so the
parent still blames exactly the row that hung or crashed, even though the results of the rows
before it may not have reached the parent yet (those are lost with the worker and scored again by
the next one: rewards are functions of their inputs).

Only the parent's own child is on the other end of the pipe: what it unpickles is the worker's
(float | None, str | None, dict[str, float] | None) replies. The worker turns a reward's result
into a float itself (a str is refused, not parsed), and a `RewardBreakdown` into its total and a
dict of str -> float parts, so no object of the user's travels back; the parent checks
finiteness, of the parts too (a non-finite part fails the row like a non-finite reward).

Measured with benchmarks/reward_worker.py (2-core shared CPU VM, load ~1, parent has torch
imported; 3 runs): the first start, including the forkserver and its preload (mostly torch),
0.95-1.5 s, overlapped with the caller's own start-up since only the first `score` waits for it
(in a 2-rank torchrun run: 1.7 s, of which the reward thread waited 0 s; see the rank log's
"reward worker ... started in" line); a restart after a timeout or crash
11-13 ms. A batch of 256 addition rows (0.02 ms in-process): 0.34-0.43 ms with replies in batches,
2.2-3.4 ms with one reply per row before (3 runs of each, alternating, 2026-11-26).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import threading
import time
import types
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from asyncflow.log import get_logger
from asyncflow.tasks.base import RewardBreakdown, Task

logger = get_logger(__name__)

FLUSH_S = 0.02
"""The worker sends the results it holds at least this often while a batch runs."""

START_TIMEOUT_S = 120.0
"""A worker that is not ready this long after its start (the first start includes the forkserver's
imports, seconds on a busy machine) cannot be started at all: an error, not a row failure."""


@dataclass
class RewardItem:
    """One row to score."""

    row: int
    """Queue row id; the caller's, for logs."""
    completion: str
    """Completion text as `split_completions` returns it."""
    answer: str
    """The problem's reference answer."""
    finished: bool
    """Whether the completion ended with EOS."""
    data: dict | None = None
    """The problem's `Problem.data`, handed to `task.reward` as a fourth argument when not None."""


@dataclass
class RewardOutcome:
    """The result of one reward call."""

    value: float | None
    """The reward, a finite float; None when the call failed."""
    error: str | None = None
    """Why it failed: the exception, a non-finite or non-number result, a timeout or a crash."""
    timed_out: bool = False
    """The call ran past the timeout (the worker was killed and restarted)."""
    parts: dict[str, float] | None = None
    """Named parts of the reward when the task returned a `RewardBreakdown` (e.g. one per reward
    function), each finite; None otherwise and for a failed call."""


def _exit_with_parent() -> None:
    """Exit when the rank process does, even from inside a hung reward call."""
    # The parent sentinel reads EOF once the rank process has died. The forkserver (this worker's
    # actual parent) outlives the rank while any worker lives, so PR_SET_PDEATHSIG cannot do this.
    # A reward that hangs holding the GIL starves this thread; torchrun then still kills the rank's
    # whole process group, worker included.
    sentinel = mp.parent_process().sentinel

    def watch() -> None:
        wait([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _call(task: Task, completion: str, answer: str, finished: bool, data: dict | None
          ) -> tuple[float | None, str | None, dict[str, float] | None]:
    try:
        if data is None:
            result = task.reward(completion, answer, finished)
        else:
            result = task.reward(completion, answer, finished, data)  # type: ignore[call-arg]
        parts = None
        if isinstance(result, RewardBreakdown):
            parts = {}
            for name, value in result.parts.items():
                if not hasattr(type(value), "__float__"):
                    return None, (f"returned part {name!r} = {type(value).__name__} "
                                  f"{value!r:.60}, not a number"), None
                parts[str(name)] = float(value)
            result = result.total
        # str has no __float__: float("1") would parse it, and a reward is a number, not text
        if not hasattr(type(result), "__float__"):
            return None, f"returned {type(result).__name__} {result!r:.60}, not a number", None
        return float(result), None, parts
    except Exception as e:  # deliberately tolerated: user reward code fails the row, not the worker
        return None, f"{type(e).__name__}: {e}", None


def _serve(conn: Connection, task: Task, progress) -> None:
    """Worker loop: consumes numbered batches of (completion, answer, finished, data), records in
    `progress` the row it is scoring, replies with lists of results in order; exits when the
    parent closes its end (or dies)."""
    _exit_with_parent()
    conn.send(("ready", time.time()))  # wall clock: comparable across processes
    while True:
        try:
            seq, items = conn.recv()
        except (EOFError, ConnectionResetError):  # the parent closed its end, or exited first
            return
        done: list[tuple[float | None, str | None, dict[str, float] | None]] = []
        flushed = time.monotonic()
        for pos, (completion, answer, finished, data) in enumerate(items):
            now = time.monotonic()
            # the record moves on before the results before it leave: the parent never holds a
            # row's result while the record still names that row
            progress[2], progress[1], progress[0] = now, pos, seq  # start first: _in_progress
            if done and now - flushed >= FLUSH_S:
                conn.send((seq, done))
                done, flushed = [], now
            done.append(_call(task, completion, answer, finished, data))
        conn.send((seq, done))


def _preload(task: Task) -> list[str]:
    """This module, the task's, and the modules the main module imports from. Every child re-runs
    the parent's main module (as `__mp_main__`): with its imports (torch, for `asyncflow.train`)
    already in the forkserver that is cheap. Not the main module itself: runpy warns when it
    re-runs a module that is already imported."""
    names = {__name__, type(task).__module__}
    for value in vars(sys.modules["__main__"]).values():
        name = value.__name__ if isinstance(value, types.ModuleType) else \
            getattr(value, "__module__", None)
        if isinstance(name, str):
            names.add(name)
    return sorted(names - {"__main__", "__mp_main__"})


def _context(task: Task) -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    # effective only before the forkserver starts (once per process); a later task's module is
    # imported by each of its workers as it unpickles the task
    ctx.set_forkserver_preload(_preload(task))
    return ctx


class RewardWorker:
    """Scores rows with `task.reward` in a child process, each call under `timeout_s`. An item
    with `data` is scored as `task.reward(completion, answer, finished, data)`.

    One caller at a time (not thread-safe); use one worker per thread that scores. The task must
    be picklable: a class at module top level of an importable module, holding no locks or sockets.
    """

    def __init__(self, task: Task, timeout_s: float):
        self.task, self.timeout_s = task, timeout_s
        self.num_starts = 0
        """Workers started so far (1 + restarts after timeouts and crashes)."""
        self._ctx = _context(task)
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._seq = 0
        self._progress = self._ctx.RawArray("d", 3)
        """(batch number, position in it, time.monotonic() at its start) of the row being scored."""
        # the first start (forkserver imports: seconds) overlaps whatever the caller does next
        self._launch()

    def _launch(self) -> None:
        conn, child = self._ctx.Pipe()
        self._progress[0] = -1.0  # no batch started in this worker
        proc = self._ctx.Process(target=_serve, args=(child, self.task, self._progress),
                                 name="reward-worker", daemon=True)
        self._launched_at = time.time()
        try:
            proc.start()
        except (TypeError, AttributeError, mp.ProcessError) as e:  # pickling the task failed
            raise TypeError(
                f"task {type(self.task).__name__} cannot be sent to its reward worker ({e}); "
                f"define task classes at module top level and keep no locks, sockets or open "
                f"files in them"
            ) from None
        finally:
            child.close()
        self._proc, self._conn, self._ready = proc, conn, False
        self.num_starts += 1

    def _await_ready(self) -> None:
        assert self._proc is not None and self._conn is not None
        if self._ready:
            return
        t0 = time.time()
        ready = self._conn.poll(START_TIMEOUT_S)
        if ready:
            try:
                hello, ready_at = self._conn.recv()
                ready = hello == "ready"
            except EOFError:
                ready = False
        if not ready:
            raise RuntimeError(
                f"reward worker for task {type(self.task).__name__} did not start (exit code "
                f"{self._stop()}; its traceback is above): the task's module must import in a "
                f"fresh process, and a script that starts a run needs `if __name__ == "
                f"\"__main__\":`")
        self._ready = True
        if self.num_starts == 1:
            logger.info("reward worker for %s started in %.2f s; its first caller waited %.2f s "
                        "(timeout %g s per call)", type(self.task).__name__,
                        ready_at - self._launched_at, time.time() - t0, self.timeout_s)

    def _stop(self) -> int | None:
        """Kill the worker (if still alive) and return its exit code."""
        assert self._proc is not None and self._conn is not None
        self._proc.kill()
        self._proc.join()
        self._conn.close()
        code = self._proc.exitcode
        self._proc = self._conn = None
        return code

    def _in_progress(self, since: float, answered: int) -> tuple[int, float]:
        """(position in the current batch, start time) of the row the worker is scoring. The
        worker writes the start time before the position and batch number, so (with x86-64's
        store order) a read that sees the same position and batch before and after reading the
        time has a time no older than that row's start. A batch the worker has not begun, or a
        record still naming an answered row: the first unanswered row, since `since` (the send
        or the last reply)."""
        while True:
            seq, pos = self._progress[0], self._progress[1]
            started = self._progress[2]
            if (self._progress[0], self._progress[1]) == (seq, pos):
                break
        if seq != self._seq or pos < answered:
            return answered, since
        return int(pos), started

    def score(self, items: list[RewardItem]) -> list[RewardOutcome]:
        """One outcome per item, in order. A timeout or crash fails the row being scored and the
        rows not answered yet go to a new worker; nothing here raises for a faulty reward."""
        out: list[RewardOutcome | None] = [None] * len(items)
        todo = list(range(len(items)))
        blame_unstarted = False
        while todo:
            if self._proc is not None and not self._proc.is_alive():
                self._stop()  # died between batches (e.g. killed from outside): no row to blame
            if self._proc is None:
                self._launch()
            self._await_ready()
            assert self._conn is not None
            self._seq += 1
            try:
                self._conn.send((self._seq, [(items[i].completion, items[i].answer,
                                              items[i].finished, items[i].data) for i in todo]))
            except ConnectionError:
                pass  # it died just now: the EOF below tells _collect
            left = self._collect(todo, out, blame_unstarted)
            # a worker that died before it began the batch fails no row, once per call: a
            # second such death blames the first row, so that every call ends
            blame_unstarted = left == todo
            todo = left
        return out  # type: ignore[return-value]

    def _collect(self, todo: list[int], out: list[RewardOutcome | None],
                 blame_unstarted: bool) -> list[int]:
        """Receive the batch `todo` into `out`; returns the rows still to score (empty unless
        the worker hung or died, which fails the row it was scoring; one that died before it
        began the batch fails none unless `blame_unstarted`)."""
        assert self._conn is not None
        answered, since = 0, time.monotonic()
        while answered < len(todo):
            pos, started = self._in_progress(since, answered)
            if self._conn.poll(max(0.0, started + self.timeout_s - time.monotonic())):
                try:
                    seq, replies = self._conn.recv()
                except (EOFError, ConnectionError):
                    began = self._progress[0] == self._seq
                    pos, _ = self._in_progress(since, answered)
                    code = self._stop()
                    if not began and not blame_unstarted:
                        return todo[answered:]
                    out[todo[pos]] = RewardOutcome(None, f"reward worker died (exit code {code})")
                    return todo[answered:pos] + todo[pos + 1:]
                if seq != self._seq:
                    continue  # left over from a call that was interrupted
                for value, error, parts in replies:
                    if error is None and not math.isfinite(value):
                        error = f"returned {value}, not a finite number"
                    for name, part in (parts or {}).items():
                        if error is None and not math.isfinite(part):
                            error = f"returned part {name!r} = {part}, not a finite number"
                    out[todo[answered]] = (RewardOutcome(value, None, parts=parts)
                                           if error is None else RewardOutcome(None, error))
                    answered += 1
                since = time.monotonic()
            elif (not self._conn.poll(0)  # a reply that arrived meanwhile is taken first
                  and self._in_progress(since, answered) == (pos, started)):  # still that row
                self._stop()
                out[todo[pos]] = RewardOutcome(None, f"timeout after {self.timeout_s:g} s",
                                               timed_out=True)
                return todo[answered:pos] + todo[pos + 1:]
        return []

    def close(self) -> None:
        """Stop the worker: it exits on EOF; one that does not within a second is killed."""
        if self._proc is None:
            return
        assert self._conn is not None
        self._conn.close()
        self._proc.join(timeout=1.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._proc = self._conn = None

    def __enter__(self) -> RewardWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
