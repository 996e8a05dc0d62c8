"""The control plane: metadata of every stored row, which stage may receive it, and who holds it.

```
 producer --reserve(n)--> [capacity wait] --row ids--> write bytes to own storage --commit(cols)-->
   row.ready_mask |= cols; for each stage whose needs became ready: stage.ready += row; notify stage
 consumer --get(stage, B, sampler)--> [wait on stage.cond] --> sampler picks <= B rows --> lease
   ack(lease)  -> row.consumed |= stage; all stages consumed -> row freed, owners told to free slots
   nack(lease) / expire_consumer (socket closed) -> rows go back to the front of stage.ready
```

Every request touches only the rows it names or returns (ready sets are kept incrementally as
ordered dicts), so its cost does not grow with the number of stored rows. One lock guards all
state; each stage has its own condition variable, so a put wakes only the stages it made ready.
This module holds the lock, the waits and the argument checks; the transitions of rows are in
`rows.py`, the ready indexes in `ready.py`, the rounds of `get_balanced` in `rounds.py` and the
saved state in `saved.py`. The queue leaves staleness alone: rows carry the policy version that
made them, and the pipeline decides what is too old.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from asyncflow.log import get_logger
from asyncflow.queue import saved
from asyncflow.queue.metadata import Grant, Lease
from asyncflow.queue.ready import StageState
from asyncflow.queue.rounds import Round, Rounds
from asyncflow.queue.rows import RowTable, as_ints
from asyncflow.queue.samplers import FifoSampler, Sampler, balance_by_tokens
from asyncflow.queue.schema import QueueConfig, Schema

logger = get_logger(__name__)


class Controller:
    """Metadata state machine of the queue; thread-safe; hosted in-process or behind `server.py`."""

    def __init__(self, cfg: QueueConfig):
        self.cfg = cfg
        self.schema = Schema(cfg.columns)
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._stages: dict[str, StageState] = {}
        for i, s in enumerate(cfg.stages):
            cond = threading.Condition(self._lock)
            self._stages[s.name] = StageState(
                i, s.name, self.schema.mask(s.needs), cond, cfg.group_size
            )
        self._stage_list = list(self._stages.values())
        self._table = RowTable(self.schema, self._stage_list, cfg.group_size)
        self._rounds = Rounds()
        self.session = uuid.uuid4().hex[:12]
        """Names this queue's shared-memory files; clients learn it when they connect."""
        self.closed = False

    # ---------------------------------------------------------------- put side

    def reserve(
        self,
        consumer: str,
        num_rows: int,
        step: int = 0,
        group_ids: list[int] | None = None,
        timeout_s: float | None = None,
    ) -> list[int]:
        """Allocate `num_rows` new row ids, blocking while the queue holds `capacity_rows` rows.
        The rows count against capacity but are offered to no stage until columns are committed."""
        cap = self.cfg.capacity_rows
        if not 1 <= num_rows <= cap:
            raise ValueError(f"num_rows={num_rows}; must be in [1, capacity_rows={cap}]")
        if group_ids is not None:
            group_ids = as_ints("group_ids", group_ids)
        if group_ids is None:
            if self.cfg.group_size > 1:
                raise ValueError(f"group_ids is required when group_size={self.cfg.group_size} > 1")
        elif len(group_ids) != num_rows:
            raise ValueError(f"len(group_ids)={len(group_ids)} != number of rows {num_rows}")
        elif min(group_ids) < 0:
            raise ValueError(f"group_ids must be >= 0, got {min(group_ids)}: a negative group id "
                             f"stands for a row of no group")  # fmt: skip
        deadline = _deadline(timeout_s if timeout_s is not None else self.cfg.timeout_s)
        with self._lock:
            self._table.check_groups(group_ids)
            while len(self._table.rows) + num_rows > cap:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"queue full: {len(self._table.rows)} of capacity_rows={cap} rows stored "
                        f"and {num_rows} more requested; no stage freed rows within the timeout"
                    )
                self._space.wait(left)
                self.check_open()
                self._table.check_groups(group_ids)
            return self._table.reserve(consumer, num_rows, int(step), group_ids)

    def commit(
        self,
        consumer: str,
        rank: int,
        row_ids: list[int],
        columns: list[str],
        slots: list[int],
        policy_versions: list[int] | None = None,
        num_tokens: list[int] | None = None,
        ack_lease: int | None = None,
    ) -> None:
        """Mark `columns` of `row_ids` ready, stored on `rank` at `slots`; wakes the stages whose
        needs became complete. Validates everything first: a refused commit changes nothing.
        `ack_lease`: these rows, all of that lease, are consumed by its stage in the same step
        (a stage's output and the end of its input are never seen apart, by a checkpoint
        either); the lease keeps the rest of its rows, and ends with its last row."""
        n = len(row_ids)
        mask = self.schema.mask(columns)
        if not columns:
            raise ValueError("commit needs at least one column")
        row_ids, slots = as_ints("row_ids", row_ids), as_ints("slots", slots)
        if policy_versions is not None:
            policy_versions = as_ints("policy_versions", policy_versions)
        num_tokens = None if num_tokens is None else as_ints("num_tokens", num_tokens)
        for name, v in (("slots", slots), ("policy_versions", policy_versions),
                        ("num_tokens", num_tokens)):  # fmt: skip
            if v is not None and len(v) != n:
                raise ValueError(f"len({name})={len(v)} != number of rows {n}")
        if len(set(row_ids)) != n:
            raise ValueError(f"row_ids contain duplicates: {row_ids}")
        with self._lock:
            lease = self._table.check_store(row_ids, columns, mask, ack_lease)
            woken = self._table.store(int(rank), row_ids, columns, mask, slots, policy_versions,
                                      num_tokens)  # fmt: skip
            for i in woken:
                self._stage_list[i].cond.notify_all()
            if lease is not None:
                self._consume_leased(lease, row_ids)
                if not lease.row_ids:
                    self._table.pop_lease(lease.lease_id)

    def release(self, row_ids: list[int]) -> None:
        """Drop rows reserved by a put that failed before its commit: the capacity they held is
        free again at once, not only when their producer disconnects. Rows with a stored column
        are left alone."""
        row_ids = as_ints("row_ids", row_ids)
        with self._lock:
            stored = len(self._table.rows)
            self._table.release(row_ids)
            if len(self._table.rows) < stored:
                self._space.notify_all()

    # ---------------------------------------------------------------- get side

    def _stage(self, stage: str) -> StageState:
        if stage not in self._stages:
            raise ValueError(f"unknown stage {stage!r}; registered stages: {list(self._stages)}")
        return self._stages[stage]

    def _check_get(self, st: StageState, batch_size: int, min_rows: int, sampler: Sampler,
                   columns: list[str] | None, dp_size: int = 1) -> list[str]:  # fmt: skip
        """Everything a get can be refused for, checked before it changes anything."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; must be >= 1")
        if not 1 <= min_rows <= batch_size:
            raise ValueError(f"min_rows={min_rows}; must be in [1, batch_size={batch_size}]")
        sampler.check(self.cfg.group_size, self.cfg.rows_per_step, batch_size * dp_size)
        needs = [c.name for i, c in enumerate(self.schema.columns) if st.needs_mask >> i & 1]
        if columns is None:
            return needs
        extra = [c for c in columns if c not in needs]
        if extra:
            self.schema.mask(extra)
            raise ValueError(
                f"stage {st.name!r} does not wait for columns {extra}; it needs {needs}"
            )
        return list(columns)

    def _wait_rows(self, st: StageState, sampler: Sampler, want_rows: int, deadline: float,
                   stop: Round | None = None) -> bool:  # fmt: skip
        """Wait until the sampler can answer; False on timeout (or when `stop` got its results)."""
        while True:
            want = sampler.wanted(st, want_rows, self.cfg.rows_per_step)
            if want <= 0 or sampler.available(st) >= want:
                return True
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.results is not None):
                return False
            st.cond.wait(left)
            self.check_open()

    def _exhausted(self, st: StageState, sampler: Sampler) -> bool:
        """The sampler wants nothing more (a step sampler whose step the stage has all taken)."""
        return sampler.wanted(st, 1, self.cfg.rows_per_step) <= 0

    def get(
        self,
        consumer: str,
        stage: str,
        batch_size: int,
        timeout_s: float | None = None,
        sampler: Sampler | None = None,
        min_rows: int = 1,
        columns: list[str] | None = None,
    ) -> Grant:
        """Lease up to `batch_size` rows ready for `stage` that it has not consumed, once at least
        `min_rows` are available (the step sampler: or the rest of its step). Empty on timeout,
        and empty with `exhausted` set when the step sampler's step has nothing left."""
        st = self._stage(stage)
        sampler = sampler or FifoSampler()
        columns = self._check_get(st, batch_size, min_rows, sampler, columns)
        deadline = _deadline(timeout_s if timeout_s is not None else self.cfg.timeout_s)
        with self._lock:
            if not self._wait_rows(st, sampler, min_rows, deadline):
                return Grant.empty()
            rows = sampler.take(st, batch_size, self._table.groups)
            if not rows:
                return Grant.empty(self._exhausted(st, sampler))
            return self._table.lease(st, consumer, rows, columns)

    def get_balanced(
        self,
        consumer: str,
        stage: str,
        dp_rank: int,
        dp_size: int,
        batch_size: int,
        timeout_s: float | None = None,
        sampler: Sampler | None = None,
        min_rows: int = 1,
        columns: list[str] | None = None,
    ) -> Grant:
        """Collective `get` of the `dp_size` ranks of a data-parallel mesh: the k-th call of every
        rank is answered together, up to `dp_size * batch_size` rows split into parts of equal size
        (+-1) and balanced token sums, so every rank runs the same number of micro-batches. If any
        rank times out before all arrived, the round answers every rank with an empty batch. When
        fewer rows than ranks are left, a rank may get an empty batch that is not `exhausted`
        while others got rows: every rank calls again (`exhausted` comes to all in one round)."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        st = self._stage(stage)
        sampler = sampler or FifoSampler()
        columns = self._check_get(st, batch_size, min_rows, sampler, columns, dp_size)
        deadline = _deadline(timeout_s if timeout_s is not None else self.cfg.timeout_s)
        with self._lock:
            seq, rnd = self._rounds.join(stage, dp_rank, dp_size, consumer)
            try:
                if rnd.results is None and rnd.full:
                    self._answer_round(st, rnd, sampler, batch_size, min_rows, columns, deadline)
                self._await_round(st, rnd, deadline)
            except BaseException:
                if rnd.results is None:  # the other ranks get an empty batch instead of waiting
                    rnd.answer_empty()
                    st.cond.notify_all()
                raise
            finally:
                self._rounds.leave(stage, seq, rnd)
            assert rnd.results is not None
            return rnd.results[dp_rank]

    def _answer_round(self, st: StageState, rnd: Round, sampler: Sampler, batch_size: int,
                      min_rows: int, columns: list[str], deadline: float) -> None:  # fmt: skip
        """The last rank to arrive waits for the rows of the whole round, then leases each rank
        its part; a rank that timed out meanwhile has answered the round empty."""
        dp_size = rnd.dp_size
        ok = self._wait_rows(st, sampler, dp_size * min_rows, deadline, stop=rnd)
        if rnd.results is not None:
            return
        rows = sampler.take(st, dp_size * batch_size, self._table.groups) if ok else []
        tokens = [self._table.rows[r].num_tokens for r in rows]
        parts = balance_by_tokens(rows, tokens, dp_size)
        # the end only when no rank got rows: the ranks must make the same calls
        done = ok and not rows and self._exhausted(st, sampler)
        rnd.results = {
            r: self._table.lease(st, rnd.consumers[r], p, columns) if p else Grant.empty(done)
            for r, p in enumerate(parts)
        }
        st.cond.notify_all()

    def _await_round(self, st: StageState, rnd: Round, deadline: float) -> None:
        """Wait for the round's answer; past the deadline with ranks missing, answer it empty."""
        while rnd.results is None:
            left = deadline - time.monotonic()
            if left <= 0 and not rnd.full:
                rnd.answer_empty()
                st.cond.notify_all()
                return
            st.cond.wait(max(left, 0.05))
            self.check_open()

    # ---------------------------------------------------------------- leases

    def ack(self, lease_id: int) -> None:
        """The lease's rows are consumed by its stage; rows every stage consumed are freed."""
        with self._lock:
            lease = self._table.pop_lease(lease_id)
            self._consume_leased(lease, lease.row_ids)

    def _consume_leased(self, lease: Lease, row_ids: list[int]) -> None:
        stored = len(self._table.rows)
        self._table.consume_leased(lease, row_ids)
        if len(self._table.rows) < stored:
            self._space.notify_all()

    def nack(self, lease_id: int) -> None:
        """Return the lease's rows to the front of the stage's ready set (redelivered first)."""
        with self._lock:
            self._table.give_back(self._table.pop_lease(lease_id)).cond.notify_all()

    def expire_consumer(self, consumer: str) -> int:
        """A consumer died: its leased rows return to the ready sets and rows it reserved but never
        wrote are dropped. Returns the number of leased rows returned."""
        with self._lock:
            leases = self._table.expire(consumer)
            for lease in leases:
                self._stage_list[lease.stage].cond.notify_all()
            self._space.notify_all()
            n = sum(len(lease.row_ids) for lease in leases)
            if n:
                logger.warning(
                    "consumer %s expired; %d leased rows returned to the queue", consumer, n
                )
            return n

    def close(self) -> None:
        """The host is shutting down (or aborting): callers waiting in-process in `reserve`,
        `get` or `get_balanced` raise ConnectionError now, as remote callers do when their
        connection drops, instead of sleeping until their timeout."""
        with self._lock:
            self.closed = True
            self._space.notify_all()
            for st in self._stage_list:
                st.cond.notify_all()

    def check_open(self) -> None:
        """ConnectionError once `close` was called."""
        if self.closed:
            raise ConnectionError("queue controller closed")

    def take_freed(self, rank: int) -> list[tuple[int, int]]:
        """(slot, row id) on `rank` of rows freed since the last call; the storage reuses them."""
        with self._lock:
            return self._table.freed.pop(rank, [])

    # ---------------------------------------------------------------- introspection, state

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = {"num_rows": len(self._table.rows), "num_leases": len(self._table.leases)}
            for st in self._stage_list:
                out[f"ready/{st.name}"] = len(st.ready)
            return out

    def num_ready(self, stage: str) -> int:
        with self._lock:
            return len(self._stage(stage).ready)

    def taken(self, stage: str) -> dict[int, int]:
        """Rows of each step that `stage` has leased or consumed (a resumed stage skips them)."""
        with self._lock:
            return dict(self._stage(stage).taken_by_step)

    def state_dict(self) -> dict[str, Any]:
        """Metadata as plain lists (`saved.state_dict`); leased rows are saved as not consumed."""
        with self._lock:
            return saved.state_dict(self._table)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace all state; outstanding leases are forgotten and waiting balanced rounds are
        answered empty. The state is read whole before anything changes: a malformed one is
        refused (ValueError) with the queue unchanged."""
        checked = saved.parse(state, self._table)
        with self._lock:
            self._rounds.reset()
            saved.load(self._table, checked)
            for st in self._stage_list:
                st.cond.notify_all()
            self._space.notify_all()


def _deadline(timeout_s: float) -> float:
    if not 0 <= timeout_s <= threading.TIMEOUT_MAX:  # NaN and inf fail too
        raise ValueError(f"timeout_s={timeout_s}; must be a finite number of seconds in "
                         f"[0, {threading.TIMEOUT_MAX:g}]")
    return time.monotonic() + timeout_s
