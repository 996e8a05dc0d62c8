"""The ready index of one stage: rows whose needed columns are all stored and that the stage has
neither leased nor consumed, kept incrementally (insertion-ordered dicts) so that samplers pick a
batch in O(batch) and a request never scans the stored rows.

A put or a get moves a whole batch (256 rows a step in the default run), so `add_rows` and
`remove_rows` update each index once per batch (dict updates, group counts per group) rather than
once per row. The indexes are plain dicts (insertion-ordered), not OrderedDicts, whose insert of
a step's 256 rows cost 4x a dict's; rows given back go first by rebuilding the dict (`add_front`),
a path the pipeline only takes after a failure. With this, the batched storage bookkeeping and
one test per put in `RowTable.store`, one default step's queue calls (benchmarks/queue_step.py,
in one process) went from 4.5 to 3.6-3.8 ms with in-process storage, 4.5-4.6 to 3.5-3.7 ms with
shared memory."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from asyncflow.queue.metadata import RowMeta


@dataclass
class StageState:
    """Incremental indexes of one stage: rows ready for it and not yet leased or consumed."""

    index: int
    name: str
    needs_mask: int
    cond: threading.Condition
    group_size: int = 1
    """Rows per group; 1 = no group index is kept (every ready row is a whole group)."""
    ready: dict[int, None] = field(default_factory=dict)
    by_step: dict[int, dict[int, None]] = field(default_factory=dict)
    group_ready: dict[int, int] = field(default_factory=dict)
    complete_groups: dict[int, None] = field(default_factory=dict)
    taken_by_step: dict[int, int] = field(default_factory=dict)
    """Rows of each step that this stage holds a lease on or has consumed."""

    def add_rows(self, rids: list[int], metas: list[RowMeta]) -> None:
        """Offer rows to the stage after those it has, in order (a group is complete from its
        last row on)."""
        self.ready.update(dict.fromkeys(rids))
        for step, step_rids in _by_value([m.step for m in metas], rids):
            self._bucket(step).update(dict.fromkeys(step_rids))
        if self.group_size > 1:
            gids = [m.group_id for m in metas]
            group_ready, done = self.group_ready, []
            for g, n in Counter(gids).items():
                n = group_ready[g] = group_ready.get(g, 0) + n
                if n == self.group_size:
                    done.append(g)
            if len(done) > 1:
                last = dict(zip(gids, range(len(gids)), strict=True))  # the position of each group's last row
                done.sort(key=last.__getitem__)
            self.complete_groups.update(dict.fromkeys(done))

    def add_front(self, rids: list[int], metas: list[RowMeta]) -> None:
        """Offer rows given back before every row the stage has, in order (redelivered first):
        the same indexes as putting each row first in turn, from the last row to the first."""
        _prepend(self.ready, rids)
        for step, step_rids in _by_value([m.step for m in metas], rids):
            _prepend(self._bucket(step), step_rids)
        if self.group_size > 1:
            completed = []  # groups in the order the row-by-row version completes them
            for meta in reversed(metas):
                g = meta.group_id
                n = self.group_ready[g] = self.group_ready.get(g, 0) + 1
                if n == self.group_size:
                    completed.append(g)
            _prepend(self.complete_groups, completed[::-1])

    def _bucket(self, step: int) -> dict[int, None]:
        by_step = self.by_step.get(step)  # not setdefault: it would build a dict every call
        if by_step is None:
            by_step = self.by_step[step] = {}
        return by_step

    def remove_rows(self, rids: list[int], metas: list[RowMeta]) -> None:
        """`remove` of each row."""
        ready, by_step = self.ready, self.by_step
        for rid in rids:
            del ready[rid]
        steps = [m.step for m in metas]
        for step, step_rids in _by_value(steps, rids):
            bucket = by_step[step]
            for rid in step_rids:
                del bucket[rid]
            if not bucket:
                del by_step[step]
        if self.group_size > 1:
            group_ready = self.group_ready
            for g, n in Counter(m.group_id for m in metas).items():
                self.complete_groups.pop(g, None)
                n = group_ready[g] - n
                if n:
                    group_ready[g] = n
                else:
                    del group_ready[g]

    def clear(self) -> None:
        self.ready.clear()
        self.by_step.clear()
        self.group_ready.clear()
        self.complete_groups.clear()
        self.taken_by_step.clear()


def _prepend(index: dict[int, None], keys: list[int]) -> None:
    """Put `keys` (not in `index`) first, in order, by rebuilding the dict."""
    rest = dict(index)
    index.clear()
    index.update(dict.fromkeys(keys))
    index.update(rest)


def _by_value(values: list[int], items: list[int]) -> list[tuple[int, list[int]]]:
    """(value, its items) for each distinct value, in order of first appearance; one pair without
    a per-item loop when every value is the same (the rows of one put share their step)."""
    if values and values.count(values[0]) == len(values):
        return [(values[0], items)]
    out: dict[int, list[int]] = {}
    for v, item in zip(values, items, strict=True):
        out.setdefault(v, []).append(item)
    return list(out.items())
