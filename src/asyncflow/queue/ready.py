"""The ready index of one stage: rows whose needed columns are all stored and that the stage has
neither leased nor consumed, kept incrementally (insertion-ordered dicts) so that samplers pick a
batch in O(batch) and a request never scans the stored rows."""

from __future__ import annotations

import threading
from collections import OrderedDict
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
        by_step = self.by_step.get(meta.step)  # not setdefault: it would build a dict every call
        if by_step is None:
            by_step = self.by_step[meta.step] = OrderedDict()
        for d in (self.ready, by_step):
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

    def remove(self, rid: int, meta: RowMeta) -> None:
        """Row `rid` is no longer offered to the stage (leased)."""
        del self.ready[rid]
        bucket = self.by_step[meta.step]
        del bucket[rid]
        if not bucket:
            del self.by_step[meta.step]
        if self.group_size > 1:
            g = meta.group_id
            self.complete_groups.pop(g, None)
            self.group_ready[g] -= 1
            if self.group_ready[g] == 0:
                del self.group_ready[g]

    def clear(self) -> None:
        self.ready.clear()
        self.by_step.clear()
        self.group_ready.clear()
        self.complete_groups.clear()
        self.taken_by_step.clear()
