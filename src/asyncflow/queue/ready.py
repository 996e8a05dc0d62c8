"""The ready index of one stage: rows whose needed columns are all stored and that the stage has
neither leased nor consumed, kept incrementally (insertion-ordered dicts) so that samplers pick a
batch in O(batch) and a request never scans the stored rows.

A put or a get moves a whole batch (256 rows a step in the default run), so `add_rows` and
`remove_rows` update each index once per batch (dict updates, group counts per group) rather than
once per row (with the lighter loops of `rows.py`, a replay of the default run's queue calls went
from 3.5 to 3.0 ms per step)."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
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
    ready: OrderedDict[int, None] = field(default_factory=OrderedDict)
    by_step: dict[int, OrderedDict[int, None]] = field(default_factory=dict)
    group_ready: dict[int, int] = field(default_factory=dict)
    complete_groups: OrderedDict[int, None] = field(default_factory=OrderedDict)
    taken_by_step: dict[int, int] = field(default_factory=dict)
    """Rows of each step that this stage holds a lease on or has consumed."""

    def add(self, rid: int, meta: RowMeta, front: bool = False) -> None:
        """Offer row `rid` to the stage: last, or first (`front`, a row given back)."""
        for d in (self.ready, self._bucket(meta.step)):
            d[rid] = None
            if front:
                d.move_to_end(rid, last=False)
        if self.group_size > 1:
            g = meta.group_id
            self.group_ready[g] = self.group_ready.get(g, 0) + 1
            if self.group_ready[g] == self.group_size:
                self.complete_groups[g] = None
                if front:
                    self.complete_groups.move_to_end(g, last=False)

    def add_rows(self, rids: list[int], metas: list[RowMeta]) -> None:
        """`add` of each row, last and in order (a group is complete from its last row on)."""
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

    def _bucket(self, step: int) -> OrderedDict[int, None]:
        by_step = self.by_step.get(step)  # not setdefault: it would build a dict every call
        if by_step is None:
            by_step = self.by_step[step] = OrderedDict()
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


def _by_value(values: list[int], items: list[int]) -> list[tuple[int, list[int]]]:
    """(value, its items) for each distinct value, in order of first appearance; one pair without
    a per-item loop when every value is the same (the rows of one put share their step)."""
    if values and values.count(values[0]) == len(values):
        return [(values[0], items)]
    out: dict[int, list[int]] = {}
    for v, item in zip(values, items, strict=True):
        out.setdefault(v, []).append(item)
    return list(out.items())
