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
"""

from __future__ import annotations

import operator
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from asyncflow.log import get_logger
from asyncflow.queue.metadata import UNKNOWN_VERSION, Grant, Lease, RowMeta
from asyncflow.queue.samplers import (
    FifoSampler,
    GroupRangeSampler,
    GroupSampler,
    Sampler,
    StageState,
    balance_by_tokens,
)
from asyncflow.queue.schema import QueueConfig, Schema

logger = get_logger(__name__)


@dataclass
class _Round:
    """One collective `get_balanced` call of all ranks of a data-parallel mesh."""

    dp_size: int
    consumers: dict[int, str] = field(default_factory=dict)
    results: dict[int, Grant] | None = None
    num_answered: int = 0


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
        self._all_stages = (1 << len(self._stage_list)) - 1
        self._track_groups = cfg.group_size > 1
        """With groups of one every ready row is a whole group: the group index is skipped."""
        self.session = uuid.uuid4().hex[:12]
        """Names this queue's shared-memory files; clients learn it when they connect."""
        self.closed = False
        self._next_lease_id = 0
        """Never reset (not even by `load_state_dict`): a late ack of an older lease must not
        consume a newer one."""
        self._reset()

    def _reset(self) -> None:
        self._rows: dict[int, RowMeta] = {}
        self._groups: dict[int, list[int]] = {}
        """group id -> its rows; rows put without group ids (group id < 0) are not indexed."""
        self._next_row_id = 0
        self._committed_below = 0
        """1 + the highest row id ever committed: `state_dict` hands out again only the ids of
        unwritten reservations above it, never an id a stored or freed row had."""
        self._leases: dict[int, Lease] = {}
        self._by_consumer: dict[str, set[int]] = {}
        self._reserved: dict[str, set[int]] = {}
        self._freed: dict[int, list[tuple[int, int]]] = {}
        """owner rank -> (slot, row id) of freed rows; the row id lets the owner skip stale entries."""
        self._rounds: dict[tuple[str, int], _Round] = {}
        self._round_seq: dict[tuple[str, int], int] = {}
        self.num_dropped_stale = 0
        for st in self._stage_list:
            st.ready.clear()
            st.by_step.clear()
            st.by_version.clear()
            st.group_ready.clear()
            st.complete_groups.clear()
            st.taken_by_step.clear()

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
            group_ids = _ints("group_ids", group_ids)
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
            self._check_groups(group_ids)
            while len(self._rows) + num_rows > cap:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"queue full: {len(self._rows)} of capacity_rows={cap} rows stored and "
                        f"{num_rows} more requested; no stage freed rows within the timeout"
                    )
                self._space.wait(left)
                self.check_open()
                self._check_groups(group_ids)
            ids = list(range(self._next_row_id, self._next_row_id + num_rows))
            self._next_row_id += num_rows
            step, rows = int(step), self._rows
            if group_ids is None:  # rows of no group: group id -1 - row, not indexed in _groups
                for rid in ids:
                    rows[rid] = RowMeta(step, -1 - rid)
            else:
                for rid, gid in zip(ids, group_ids, strict=True):
                    rows[rid] = RowMeta(step, gid)
                    self._groups.setdefault(gid, []).append(rid)
            self._reserved.setdefault(consumer, set()).update(ids)
            return ids

    def _check_groups(self, group_ids: list[int] | None) -> None:
        if group_ids is None:
            return
        counts: dict[int, int] = {}
        for g in group_ids:
            counts[g] = counts.get(g, 0) + 1
        for g, c in counts.items():
            have = len(self._groups.get(g, ()))
            if have + c > self.cfg.group_size:
                raise ValueError(
                    f"group_id={g} would hold {have + c} rows; group_size={self.cfg.group_size}"
                )

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
        row_ids, slots = _ints("row_ids", row_ids), _ints("slots", slots)
        policy_versions = None if policy_versions is None else _ints("policy_versions",
                                                                      policy_versions)
        num_tokens = None if num_tokens is None else _ints("num_tokens", num_tokens)
        for name, v in (
            ("slots", slots),
            ("policy_versions", policy_versions),
            ("num_tokens", num_tokens),
        ):
            if v is not None and len(v) != n:
                raise ValueError(f"len({name})={len(v)} != number of rows {n}")
        if len(set(row_ids)) != n:
            raise ValueError(f"row_ids contain duplicates: {row_ids}")
        col_idx = [self.schema.index[c] for c in columns]
        with self._lock:
            lease = None if ack_lease is None else self._leases.get(ack_lease)
            if ack_lease is not None:
                if lease is None:
                    raise ValueError(f"ack_lease={ack_lease} is not held (already acked, "
                                     "returned, or its consumer expired)")  # fmt: skip
                outside = set(row_ids).difference(lease.row_ids)
                if outside:
                    raise ValueError(f"rows {sorted(outside)[:8]} are not held by lease "
                                     f"{ack_lease} (still to consume: {lease.row_ids[:8]})")
            for rid in row_ids:
                meta = self._rows.get(rid)
                if meta is None:
                    what = (
                        "was already freed"
                        if 0 <= rid < self._next_row_id
                        else "was never reserved"
                    )
                    raise ValueError(f"put to row {rid}, which {what}; put new rows with rows=None")
                if meta.ready_mask & mask:
                    dup = [c for c in columns if meta.ready_mask >> self.schema.index[c] & 1]
                    raise ValueError(
                        f"row {rid}: columns {dup} are already stored; columns are write-once"
                    )
            woken: set[int] = set()
            rank = int(rank)
            stages = [(st, 1 << st.index, st.needs_mask) for st in self._stage_list]
            self._committed_below = max(self._committed_below, max(row_ids, default=-1) + 1)
            for i, rid in enumerate(row_ids):
                meta = self._rows[rid]
                loc = (rank, slots[i])
                for c in col_idx:
                    meta.locations[c] = loc
                old_mask = meta.ready_mask
                new_mask = meta.ready_mask = old_mask | mask
                if num_tokens is not None:
                    meta.num_tokens = num_tokens[i]
                if policy_versions is not None and policy_versions[i] != meta.policy_version:
                    self._set_version(rid, meta, policy_versions[i])
                busy = meta.consumed_mask | meta.leased_mask
                for st, bit, needs in stages:
                    if not busy & bit and new_mask & needs == needs and old_mask & needs != needs:
                        self._make_ready(st, rid, meta)
                        woken.add(st.index)
            for s in self._reserved.values():
                s.difference_update(row_ids)
            for i in woken:
                self._stage_list[i].cond.notify_all()
            if lease is not None:
                self._consume_leased(lease, row_ids)
                if not lease.row_ids:
                    self._pop_lease(lease.lease_id)

    def release(self, row_ids: list[int]) -> None:
        """Drop rows reserved by a put that failed before its commit: the capacity they held is
        free again at once, not only when their producer disconnects. Rows with a stored column
        are left alone."""
        row_ids = _ints("row_ids", row_ids)
        with self._lock:
            stored = len(self._rows)
            for rid in row_ids:
                meta = self._rows.get(rid)
                if meta is not None and meta.ready_mask == 0:
                    self._free(rid)
            for s in self._reserved.values():
                s.difference_update(row_ids)
            if len(self._rows) < stored:
                self._space.notify_all()

    def _set_version(self, rid: int, meta: RowMeta, version: int) -> None:
        for st in self._stage_list:
            if rid in st.ready:
                bucket = st.by_version[meta.policy_version]
                del bucket[rid]
                if not bucket:
                    del st.by_version[meta.policy_version]
                st.by_version.setdefault(version, OrderedDict())[rid] = None
        meta.policy_version = version

    # ---------------------------------------------------------------- indexes

    def _make_ready(self, st: StageState, rid: int, meta: RowMeta, front: bool = False) -> None:
        by_step = st.by_step.get(meta.step)  # not setdefault: it would build a dict every call
        if by_step is None:
            by_step = st.by_step[meta.step] = OrderedDict()
        by_version = st.by_version.get(meta.policy_version)
        if by_version is None:
            by_version = st.by_version[meta.policy_version] = OrderedDict()
        for d in (st.ready, by_step, by_version):
            d[rid] = None
            if front:
                d.move_to_end(rid, last=False)
        if self._track_groups:
            g = meta.group_id
            st.group_ready[g] = st.group_ready.get(g, 0) + 1
            if st.group_ready[g] == self.cfg.group_size:
                st.complete_groups[g] = None
                if front:
                    st.complete_groups.move_to_end(g, last=False)

    def _unready(self, st: StageState, rid: int, meta: RowMeta) -> None:
        del st.ready[rid]
        for index, key in ((st.by_step, meta.step), (st.by_version, meta.policy_version)):
            bucket = index[key]
            del bucket[rid]
            if not bucket:
                del index[key]
        if self._track_groups:
            g = meta.group_id
            st.complete_groups.pop(g, None)
            st.group_ready[g] -= 1
            if st.group_ready[g] == 0:
                del st.group_ready[g]

    def _consume(self, st: StageState, rid: int) -> None:
        meta = self._rows[rid]
        meta.consumed_mask |= 1 << st.index
        if meta.consumed_mask == self._all_stages:
            self._free(rid)

    def _free(self, rid: int) -> None:
        """Forget a row; the caller wakes `_space` waiters once it has freed what it frees."""
        meta = self._rows.pop(rid)
        if meta.group_id >= 0:
            group = self._groups[meta.group_id]
            group.remove(rid)
            if not group:
                del self._groups[meta.group_id]
        for owner, slot in set(meta.locations.values()):
            self._freed.setdefault(owner, []).append((slot, rid))

    def _evict_stale(self, st: StageState, min_policy_version: int | None,
                     grouped: bool = False) -> None:  # fmt: skip
        """The one staleness enforcement point: rows older than `min_policy_version` are dropped
        for this stage (counted in `num_dropped_stale`), oldest version first; O(dropped rows).
        For a sampler of whole groups a group is as stale as its oldest row: it is dropped whole
        once complete (a fresh rest of a group could never be delivered, nor freed); until then
        its stale rows are looked at again on every get."""
        if min_policy_version is None:
            return
        stored = len(self._rows)
        grouped = grouped and self._track_groups
        for v in [v for v in st.by_version if UNKNOWN_VERSION < v < min_policy_version]:
            for rid in list(st.by_version.get(v, ())):  # a group's drop may have taken some
                if rid not in st.ready:
                    continue
                meta = self._rows[rid]
                if grouped and meta.group_id not in st.complete_groups:
                    continue
                for r in list(self._groups[meta.group_id]) if grouped else [rid]:
                    m = self._rows[r]
                    self._unready(st, r, m)
                    st.taken_by_step[m.step] = st.taken_by_step.get(m.step, 0) + 1
                    self.num_dropped_stale += 1
                    self._consume(st, r)
        if len(self._rows) < stored:
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

    def _lease(self, st: StageState, consumer: str, rows: list[int], columns: list[str]) -> Grant:
        metas = [self._rows[r] for r in rows]
        locations = self._locations(metas, columns)  # first: a failure leaves no lease behind
        for rid, meta in zip(rows, metas, strict=True):
            self._unready(st, rid, meta)
            meta.leased_mask |= 1 << st.index
            st.taken_by_step[meta.step] = st.taken_by_step.get(meta.step, 0) + 1
        lease_id = self._next_lease_id
        self._next_lease_id += 1
        self._leases[lease_id] = Lease(lease_id, st.index, consumer, rows)
        self._by_consumer.setdefault(consumer, set()).add(lease_id)
        return Grant(
            lease_id, list(rows), [m.step for m in metas], [m.group_id for m in metas],
            [m.policy_version for m in metas], [m.num_tokens for m in metas], locations,
        )  # fmt: skip

    def _locations(self, metas: list[RowMeta], columns: list[str]
                   ) -> dict[str, tuple[list[int], list[int]]]:  # fmt: skip
        locations: dict[str, tuple[list[int], list[int]]] = {}
        last_pairs: list[tuple[int, int]] = []
        for c in columns:
            i = self.schema.index[c]
            pairs = [m.locations[i] for m in metas]
            if pairs != last_pairs:  # columns put together share their (owner, slot) lists
                owners, slots = zip(*pairs, strict=True)
                last, last_pairs = (list(owners), list(slots)), pairs
            locations[c] = last
        return locations

    def _wait_rows(self, st: StageState, sampler: Sampler, want_rows: int, deadline: float,
                   min_policy_version: int | None, stop: _Round | None = None,
                   grouped: bool = False) -> bool:  # fmt: skip
        """Wait until the sampler can answer; False on timeout (or when `stop` got its results)."""
        while True:
            self._evict_stale(st, min_policy_version, grouped)
            want = sampler.wanted(st, want_rows, self.cfg.rows_per_step)
            if want <= 0 or sampler.available(st) >= want:
                return True
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.results is not None):
                return False
            st.cond.wait(left)
            self.check_open()

    def get(
        self,
        consumer: str,
        stage: str,
        batch_size: int,
        timeout_s: float | None = None,
        sampler: Sampler | None = None,
        min_rows: int = 1,
        columns: list[str] | None = None,
        min_policy_version: int | None = None,
    ) -> Grant:
        """Lease up to `batch_size` rows ready for `stage` that it has not consumed, once at least
        `min_rows` are available (the step sampler: or the rest of its step). Empty on timeout."""
        return self.get_many(consumer, stage, batch_size, 1, timeout_s, sampler, min_rows,
                             columns, min_policy_version)[0]  # fmt: skip

    def get_many(
        self,
        consumer: str,
        stage: str,
        batch_size: int,
        count: int,
        timeout_s: float | None = None,
        sampler: Sampler | None = None,
        min_rows: int = 1,
        columns: list[str] | None = None,
        min_policy_version: int | None = None,
    ) -> list[Grant]:
        """Up to `count` grants, each what `get` would answer at that moment and each its own
        lease (acked on its own): waits as `get` for the first, then adds grants only while the
        sampler can answer without waiting. An empty grant ends the list (timeout, or the step's
        end, so a streaming consumer learns it without another round trip)."""
        if count < 1:
            raise ValueError(f"count={count}; must be >= 1")
        st = self._stage(stage)
        sampler = sampler or FifoSampler()
        columns = self._check_get(st, batch_size, min_rows, sampler, columns)
        deadline = _deadline(timeout_s if timeout_s is not None else self.cfg.timeout_s)
        grants: list[Grant] = []
        grouped = _grouped(sampler)
        with self._lock:
            if not self._wait_rows(st, sampler, min_rows, deadline, min_policy_version,
                                   grouped=grouped):  # fmt: skip
                return [Grant.empty()]
            while len(grants) < count:
                rows = sampler.take(st, batch_size, self._groups)
                if not rows:
                    grants.append(Grant.empty(self._exhausted(st, sampler)))
                    break
                grants.append(self._lease(st, consumer, rows, columns))
                if len(grants) == count:
                    break
                self._evict_stale(st, min_policy_version, grouped)
                want = sampler.wanted(st, min_rows, self.cfg.rows_per_step)
                if want > 0 and sampler.available(st) < want:
                    break  # the rest would have to wait: a later call waits for it
            return grants

    def _exhausted(self, st: StageState, sampler: Sampler) -> bool:
        """The sampler wants nothing more (a step sampler whose step the stage has all taken)."""
        return sampler.wanted(st, 1, self.cfg.rows_per_step) <= 0

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
        min_policy_version: int | None = None,
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
            seq = self._round_seq.get((stage, dp_rank), 0)
            rnd = self._rounds.get((stage, seq))
            if rnd is not None and rnd.dp_size != dp_size:  # refused: this rank stays at `seq`
                raise ValueError(
                    f"dp_size={dp_size} but other ranks of this round use {rnd.dp_size}"
                )
            if rnd is None:
                rnd = self._rounds[(stage, seq)] = _Round(dp_size)
            self._round_seq[(stage, dp_rank)] = seq + 1
            rnd.consumers[dp_rank] = consumer
            try:
                if rnd.results is None and len(rnd.consumers) == dp_size:
                    ok = self._wait_rows(
                        st, sampler, dp_size * min_rows, deadline, min_policy_version, rnd,
                        grouped=_grouped(sampler),
                    )
                    if rnd.results is None:
                        rows = sampler.take(st, dp_size * batch_size, self._groups) if ok else []
                        tokens = [self._rows[r].num_tokens for r in rows]
                        parts = balance_by_tokens(rows, tokens, dp_size)
                        # the end only when no rank got rows: the ranks must make the same calls
                        done = ok and not rows and self._exhausted(st, sampler)
                        rnd.results = {
                            r: self._lease(st, rnd.consumers[r], p, columns) if p
                            else Grant.empty(done) for r, p in enumerate(parts)
                        }  # fmt: skip
                        st.cond.notify_all()
                while rnd.results is None:
                    left = deadline - time.monotonic()
                    if left <= 0 and len(rnd.consumers) < dp_size:
                        rnd.results = {r: Grant.empty() for r in range(dp_size)}
                        st.cond.notify_all()
                        break
                    st.cond.wait(max(left, 0.05))
                    self.check_open()
            except BaseException:
                if rnd.results is None:  # the other ranks get an empty batch instead of waiting
                    rnd.results = {r: Grant.empty() for r in range(dp_size)}
                    st.cond.notify_all()
                raise
            finally:
                rnd.num_answered += 1
                # after a load_state_dict the key may already name a newer round: not ours
                if rnd.num_answered == dp_size and self._rounds.get((stage, seq)) is rnd:
                    del self._rounds[(stage, seq)]
            return rnd.results[dp_rank]

    # ---------------------------------------------------------------- leases

    def _pop_lease(self, lease_id: int) -> Lease:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            raise ValueError(
                f"lease {lease_id} is not held (already acked, returned, or its consumer expired)"
            )
        self._by_consumer[lease.consumer].discard(lease_id)
        return lease

    def ack(self, lease_id: int) -> None:
        """The lease's rows are consumed by its stage; rows every stage consumed are freed."""
        with self._lock:
            lease = self._pop_lease(lease_id)
            self._consume_leased(lease, lease.row_ids)

    def _consume_leased(self, lease: Lease, row_ids: list[int]) -> None:
        """`row_ids` of `lease` are consumed by its stage and leave the lease."""
        st = self._stage_list[lease.stage]
        stored = len(self._rows)
        keep = ~(1 << st.index)
        for rid in row_ids:
            self._rows[rid].leased_mask &= keep
            self._consume(st, rid)
        if row_ids is not lease.row_ids:
            done = set(row_ids)
            lease.row_ids = [r for r in lease.row_ids if r not in done]
        if len(self._rows) < stored:
            self._space.notify_all()

    def nack(self, lease_id: int) -> None:
        """Return the lease's rows to the front of the stage's ready set (redelivered first)."""
        with self._lock:
            self._return(self._pop_lease(lease_id))

    def _return(self, lease: Lease) -> None:
        st = self._stage_list[lease.stage]
        for rid in reversed(lease.row_ids):
            meta = self._rows[rid]
            meta.leased_mask &= ~(1 << st.index)
            st.taken_by_step[meta.step] -= 1
            self._make_ready(st, rid, meta, front=True)
        st.cond.notify_all()

    def expire_consumer(self, consumer: str) -> int:
        """A consumer died: its leased rows return to the ready sets and rows it reserved but never
        wrote are dropped. Returns the number of leased rows returned."""
        with self._lock:
            n = 0
            # newest first, as a stream gives back: the oldest rows end up in front
            for lease_id in sorted(self._by_consumer.pop(consumer, ()), reverse=True):
                lease = self._leases.pop(lease_id)
                n += len(lease.row_ids)
                self._return(lease)
            for rid in self._reserved.pop(consumer, ()):
                if rid in self._rows and self._rows[rid].ready_mask == 0:
                    self._free(rid)
            self._space.notify_all()
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
            return self._freed.pop(rank, [])

    # ---------------------------------------------------------------- introspection, state

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = {"num_rows": len(self._rows), "num_leases": len(self._leases),
                   "num_dropped_stale": self.num_dropped_stale}  # fmt: skip
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
        """Metadata as plain lists. Leased rows are saved as not consumed (redelivered after a
        restore). Rows reserved but never written are not saved; the ids of those after the last
        written row are handed out again after a restore, so a re-run producer gets the row ids
        it got the first time. An id below a written one is not: another row may have had it."""
        with self._lock:
            rows = []
            next_row_id = self._next_row_id
            for rid, m in self._rows.items():
                if m.ready_mask == 0:
                    if rid >= self._committed_below:
                        next_row_id = min(next_row_id, rid)
                    continue
                locs = [[c, o, s] for c, (o, s) in m.locations.items()]
                rows.append([rid, m.step, m.group_id, m.policy_version, m.num_tokens, m.ready_mask,
                             m.consumed_mask, locs])  # fmt: skip
            orders = {}
            taken = {}
            for st in self._stage_list:
                leased = [
                    r
                    for lease in self._leases.values()
                    if lease.stage == st.index
                    for r in lease.row_ids
                ]
                orders[st.name] = leased + list(st.ready)
                t = dict(st.taken_by_step)
                for r in leased:
                    t[self._rows[r].step] -= 1
                taken[st.name] = [[k, v] for k, v in t.items()]
            return {
                "next_row_id": next_row_id,
                "rows": rows,
                "ready_order": orders,
                "taken_by_step": taken,
                "freed": [[o, [list(e) for e in s]] for o, s in self._freed.items()],
                "num_dropped_stale": self.num_dropped_stale,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace all state; outstanding leases are forgotten and waiting balanced rounds are
        answered empty. The state is read whole before anything changes: a malformed one is
        refused (ValueError) with the queue unchanged."""
        try:
            rows: dict[int, RowMeta] = {}
            for rid, step, gid, ver, tok, ready, consumed, locs in state["rows"]:
                m = RowMeta(*_ints("row", [step, gid, ver, tok, ready, consumed]))
                m.locations = {c: (o, s) for c, o, s in (_ints("location", x) for x in locs)}
                rows[operator.index(rid)] = m
            orders = {st.name: _ints("ready_order", state["ready_order"][st.name])
                      for st in self._stage_list}  # fmt: skip
            taken = {st.name: dict(_ints("taken_by_step", kv)
                                   for kv in state["taken_by_step"][st.name])
                     for st in self._stage_list}  # fmt: skip
            freed = {operator.index(o): [tuple(_ints("freed", e)) for e in es]
                     for o, es in state["freed"]}  # fmt: skip
            next_row_id = operator.index(state["next_row_id"])
            num_dropped_stale = operator.index(state["num_dropped_stale"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a queue state: {type(e).__name__}: {e}") from None
        unknown = [r for order in orders.values() for r in order if r not in rows]
        if unknown:
            raise ValueError(f"not a queue state: ready rows {unknown[:8]} are not stored")
        for st in self._stage_list:
            order, needs = orders[st.name], st.needs_mask
            bad = [r for r in order if rows[r].ready_mask & needs != needs
                   or rows[r].consumed_mask >> st.index & 1
                   or any(c not in rows[r].locations for c in range(len(self.schema.columns))
                          if needs >> c & 1)]  # fmt: skip
            if bad or len(set(order)) != len(order):
                raise ValueError(f"not a queue state: stage {st.name!r} lists rows {bad[:8]} "
                                 "that are not ready for it, or a row twice")  # fmt: skip
        # a state written before row ids stopped being reused may name a stored id: never again
        next_row_id = max(next_row_id, max(rows, default=-1) + 1)
        ungrouped = [rid for rid, m in rows.items() if m.group_id < 0]
        if self._track_groups and ungrouped:
            raise ValueError(f"rows {ungrouped[:8]} of this state have negative group ids, which "
                             f"now mean 'no group'; group_size={self.cfg.group_size} needs groups")  # fmt: skip
        with self._lock:
            for rnd in self._rounds.values():
                if rnd.results is None:
                    rnd.results = {r: Grant.empty() for r in range(rnd.dp_size)}
            self._reset()
            self._next_row_id = self._committed_below = next_row_id
            self._rows = rows
            for rid, m in rows.items():
                if m.group_id >= 0:
                    self._groups.setdefault(m.group_id, []).append(rid)
            for st in self._stage_list:
                for rid in orders[st.name]:
                    self._make_ready(st, rid, rows[rid])
                st.taken_by_step = taken[st.name]
            self._freed = freed  # type: ignore[assignment]
            self.num_dropped_stale = num_dropped_stale
            for st in self._stage_list:
                st.cond.notify_all()
            self._space.notify_all()


def _grouped(sampler: Sampler) -> bool:
    """The sampler hands out whole groups only."""
    return isinstance(sampler, GroupSampler | GroupRangeSampler)


def _ints(name: str, values: list[Any]) -> list[int]:
    """`values` as a list of ints; anything else (a float or a string from a JSON peer) is refused
    before any state changes."""
    try:
        return [operator.index(v) for v in values]
    except TypeError:  # also a type whose __index__ refuses (a float or multi-element tensor)
        for v in values:
            try:
                operator.index(v)
            except TypeError:
                raise ValueError(f"{name} must hold integers, got {v!r}") from None
        raise


def _deadline(timeout_s: float) -> float:
    if not 0 <= timeout_s <= threading.TIMEOUT_MAX:  # NaN and inf fail too
        raise ValueError(f"timeout_s={timeout_s}; must be a finite number of seconds in "
                         f"[0, {threading.TIMEOUT_MAX:g}]")
    return time.monotonic() + timeout_s
