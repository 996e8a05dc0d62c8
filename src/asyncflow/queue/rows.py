"""The row state machine: metadata of every stored row, and the leases and reservations on rows.

```
 reserve      -> row counts against capacity, offered to no stage
 store(cols)  -> ready_mask |= cols; every stage whose needs became complete: stage.add_rows
 lease        -> stage.remove_rows; leased_mask |= stage
 consume      -> leased_mask &= ~stage; consumed_mask |= stage; all stages consumed -> freed
 give back    -> leased_mask &= ~stage; stage.add_front(rows) (redelivered first)
 freed        -> forgotten; (slot, row id) queued for each owner, whose storage reuses the slot
```

No lock and no waiting here: the controller calls every method under its lock and wakes the
waiters that a transition concerns (methods return what changed, or the caller compares
`len(rows)` before and after to see whether rows were freed).
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

from asyncflow.queue.metadata import Grant, Lease, RowMeta
from asyncflow.queue.ready import StageState
from asyncflow.queue.schema import Schema


class RowTable:
    """Rows, groups, leases and reservations of one queue, and every transition between them."""

    def __init__(self, schema: Schema, stages: list[StageState], group_size: int):
        self.schema, self.stages, self.group_size = schema, stages, group_size
        self.all_stages = (1 << len(stages)) - 1
        self.next_lease_id = 0
        """Never reset (not even by `clear`): a late ack of an older lease must not consume a
        newer one."""
        self.clear()

    def clear(self) -> None:
        """Forget every row, lease and reservation (the stages' indexes too)."""
        self.rows: dict[int, RowMeta] = {}
        self.groups: dict[int, list[int]] = {}
        """group id -> its rows; rows put without group ids (group id < 0) are not indexed."""
        self.next_row_id = 0
        self.committed_below = 0
        """1 + the highest row id ever committed: `state_dict` hands out again only the ids of
        unwritten reservations above it, never an id a stored or freed row had."""
        self.leases: dict[int, Lease] = {}
        self.by_consumer: dict[str, set[int]] = {}
        self.reserved: dict[str, set[int]] = {}
        self.freed: dict[int, list[tuple[int, int]]] = {}
        """owner rank -> (slot, row id) of freed rows; the row id lets the owner skip stale
        entries."""
        for st in self.stages:
            st.clear()

    # ---------------------------------------------------------------- put side

    def check_groups(self, group_ids: list[int] | None) -> None:
        """ValueError if adding rows of `group_ids` would make a group larger than group_size."""
        if group_ids is None:
            return
        counts: dict[int, int] = {}
        for g in group_ids:
            counts[g] = counts.get(g, 0) + 1
        for g, c in counts.items():
            have = len(self.groups.get(g, ()))
            if have + c > self.group_size:
                raise ValueError(f"group_id={g} would hold {have + c} rows; "
                                 f"group_size={self.group_size}")  # fmt: skip

    def reserve(self, consumer: str, num_rows: int, step: int,
                group_ids: list[int] | None) -> list[int]:  # fmt: skip
        """New row ids, held by `consumer` until their columns are stored."""
        ids = list(range(self.next_row_id, self.next_row_id + num_rows))
        self.next_row_id += num_rows
        rows = self.rows
        if group_ids is None:  # rows of no group: group id -1 - row, not indexed in `groups`
            for rid in ids:
                rows[rid] = RowMeta(step, -1 - rid)
        else:
            for rid, gid in zip(ids, group_ids, strict=True):
                rows[rid] = RowMeta(step, gid)
                self.groups.setdefault(gid, []).append(rid)
        self.reserved.setdefault(consumer, set()).update(ids)
        return ids

    def check_store(self, row_ids: list[int], columns: list[str], mask: int,
                    ack_lease: int | None) -> Lease | None:  # fmt: skip
        """Everything a commit can be refused for; the lease `ack_lease` names, if any."""
        lease = None if ack_lease is None else self.leases.get(ack_lease)
        if ack_lease is not None:
            if lease is None:
                raise ValueError(f"ack_lease={ack_lease} is not held (already acked, "
                                 "returned, or its consumer expired)")  # fmt: skip
            outside = set(row_ids).difference(lease.row_ids)
            if outside:
                raise ValueError(f"rows {sorted(outside)[:8]} are not held by lease "
                                 f"{ack_lease} (still to consume: {lease.row_ids[:8]})")
        for rid in row_ids:
            meta = self.rows.get(rid)
            if meta is None:
                what = "was already freed" if 0 <= rid < self.next_row_id else "was never reserved"
                raise ValueError(f"put to row {rid}, which {what}; put new rows with rows=None")
            if meta.ready_mask & mask:
                dup = [c for c in columns if meta.ready_mask >> self.schema.index[c] & 1]
                raise ValueError(
                    f"row {rid}: columns {dup} are already stored; columns are write-once"
                )
        return lease

    def store(self, rank: int, row_ids: list[int], columns: list[str], mask: int,
              slots: list[int], policy_versions: list[int] | None,
              num_tokens: list[int] | None) -> set[int]:  # fmt: skip
        """Columns of `row_ids` are stored on `rank` at `slots` (checked by `check_store`).
        Returns the indexes of the stages that got ready rows."""
        col_idx = [self.schema.index[c] for c in columns]
        self.committed_below = max(self.committed_below, max(row_ids, default=-1) + 1)
        metas = [self.rows[rid] for rid in row_ids]
        old_masks = [m.ready_mask for m in metas]
        for meta, old, slot in zip(metas, old_masks, slots, strict=True):
            meta.ready_mask = old | mask
            loc = (rank, slot)
            for c in col_idx:
                meta.locations[c] = loc
        if num_tokens is not None:
            for meta, n in zip(metas, num_tokens, strict=True):
                meta.num_tokens = n
        if policy_versions is not None:
            for meta, v in zip(metas, policy_versions, strict=True):
                meta.policy_version = v
        woken: set[int] = set()
        # rows put together have had the same columns so far: one test then stands for all
        same = bool(old_masks) and old_masks.count(old_masks[0]) == len(old_masks)
        # only a stage needing one of these columns can become ready (saves a test per row)
        for st in self.stages:
            needs, bit = st.needs_mask, 1 << st.index
            if not needs & mask:
                continue
            if same:
                old = old_masks[0]
                # a stage never offered a row has not leased or consumed it either (a loaded
                # state is checked for this: `saved._check_orders`)
                if old & needs != needs and (old | mask) & needs == needs:
                    st.add_rows(row_ids, metas)
                    woken.add(st.index)
                continue
            ready = [i for i, (m, old) in enumerate(zip(metas, old_masks, strict=True))
                     if old & needs != needs and (old | mask) & needs == needs
                     and not (m.consumed_mask | m.leased_mask) & bit]  # fmt: skip
            if ready:
                st.add_rows([row_ids[i] for i in ready], [metas[i] for i in ready])
                woken.add(st.index)
        for s in self.reserved.values():
            s.difference_update(row_ids)
        return woken

    def release(self, row_ids: list[int]) -> None:
        """Drop reserved rows that hold no stored column; other rows are left alone."""
        for rid in row_ids:
            meta = self.rows.get(rid)
            if meta is not None and meta.ready_mask == 0:
                self.free(rid)
        for s in self.reserved.values():
            s.difference_update(row_ids)

    def free(self, rid: int) -> None:
        """Forget a row; its owners learn its slots from `freed`."""
        meta = self.rows.pop(rid)
        if meta.group_id >= 0:
            group = self.groups[meta.group_id]
            group.remove(rid)
            if not group:
                del self.groups[meta.group_id]
        for owner, slot in set(meta.locations.values()):
            self.freed.setdefault(owner, []).append((slot, rid))

    # ---------------------------------------------------------------- leases

    def lease(self, st: StageState, consumer: str, rows: list[int], columns: list[str]) -> Grant:
        """`rows` (ready for `st`) leave its ready index and are leased to `consumer`."""
        metas = [self.rows[r] for r in rows]
        locations = self._locations(metas, columns)  # first: a failure leaves no lease behind
        st.remove_rows(rows, metas)
        bit = 1 << st.index
        for meta in metas:
            meta.leased_mask |= bit
        steps = [m.step for m in metas]
        taken = st.taken_by_step
        if steps and steps.count(steps[0]) == len(steps):  # one step's rows (step samplers)
            taken[steps[0]] = taken.get(steps[0], 0) + len(steps)
        else:
            for step, n in Counter(steps).items():
                taken[step] = taken.get(step, 0) + n
        lease_id = self.next_lease_id
        self.next_lease_id += 1
        self.leases[lease_id] = Lease(lease_id, st.index, consumer, rows)
        self.by_consumer.setdefault(consumer, set()).add(lease_id)
        return Grant(
            lease_id, list(rows), steps, [m.group_id for m in metas],
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

    def pop_lease(self, lease_id: int) -> Lease:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            raise ValueError(
                f"lease {lease_id} is not held (already acked, returned, or its consumer expired)"
            )
        self.by_consumer[lease.consumer].discard(lease_id)
        return lease

    def consume_leased(self, lease: Lease, row_ids: list[int]) -> None:
        """`row_ids` of `lease` are consumed by its stage and leave the lease."""
        bit = 1 << lease.stage
        keep, everyone, rows = ~bit, self.all_stages, self.rows
        freed = []
        for rid in row_ids:
            meta = rows[rid]
            meta.leased_mask &= keep
            meta.consumed_mask |= bit
            if meta.consumed_mask == everyone:
                freed.append(rid)
        for rid in freed:
            self.free(rid)
        if row_ids is not lease.row_ids:
            done = set(row_ids)
            lease.row_ids = [r for r in lease.row_ids if r not in done]

    def give_back(self, lease: Lease) -> StageState:
        """The rows of a popped lease go back to the front of its stage's ready index."""
        st = self.stages[lease.stage]
        metas = [self.rows[rid] for rid in lease.row_ids]
        for meta in metas:
            meta.leased_mask &= ~(1 << st.index)
            st.taken_by_step[meta.step] -= 1
        st.add_front(lease.row_ids, metas)
        return st

    def expire(self, consumer: str) -> list[Lease]:
        """A consumer died: its leases are given back (returned) and the rows it reserved but
        never wrote are dropped."""
        leases = []
        # newest first, as a consumer gives back: the oldest rows end up in front
        for lease_id in sorted(self.by_consumer.pop(consumer, ()), reverse=True):
            lease = self.leases.pop(lease_id)
            self.give_back(lease)
            leases.append(lease)
        for rid in self.reserved.pop(consumer, ()):
            if rid in self.rows and self.rows[rid].ready_mask == 0:
                self.free(rid)
        return leases


def as_ints(name: str, values: list[Any]) -> list[int]:
    """`values` as a list of ints; anything else (a float or a string from a JSON peer) is refused
    before any state changes."""
    try:
        return list(map(operator.index, values))
    except TypeError:  # also a type whose __index__ refuses (a float or multi-element tensor)
        for v in values:
            try:
                operator.index(v)
            except TypeError:
                raise ValueError(f"{name} must hold integers, got {v!r}") from None
        raise
