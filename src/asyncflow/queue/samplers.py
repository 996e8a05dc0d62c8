"""Samplers: which ready rows a `get` receives. Each reads the per-stage indexes in `StageState`
and costs O(batch), never O(stored rows).

Samplers cross the control socket as small typed dicts (`to_dict` / `sampler_from_dict`).
Token balancing across a data-parallel mesh is `balance_by_tokens`, used by `Controller.get_balanced`.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Any, Protocol

from asyncflow.queue.ready import StageState


class Sampler(Protocol):
    """Chooses rows from a stage's ready indexes; the controller then leases them."""

    def to_dict(self) -> dict[str, Any]: ...

    def check(self, group_size: int, rows_per_step: int, batch_size: int) -> None:
        """Refuse (ValueError) a request this sampler can never answer, before the controller
        changes anything: `batch_size` is the most rows one call may take."""
        ...

    def wanted(self, st: StageState, min_rows: int, rows_per_step: int) -> int:
        """Rows that must be available before answering; 0 = answer now even if empty."""
        ...

    def available(self, st: StageState) -> int: ...

    def take(self, st: StageState, batch_size: int, groups: dict[int, list[int]]) -> list[int]: ...


@dataclass
class FifoSampler:
    """Oldest ready rows first."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "fifo"}

    def check(self, group_size: int, rows_per_step: int, batch_size: int) -> None:
        pass

    def wanted(self, st: StageState, min_rows: int, rows_per_step: int) -> int:
        return min_rows

    def available(self, st: StageState) -> int:
        return len(st.ready)

    def take(self, st: StageState, batch_size: int, groups: dict[int, list[int]]) -> list[int]:
        return list(itertools.islice(st.ready, batch_size))


@dataclass
class GroupSampler:
    """Only whole groups (all `group_size` rows ready for the stage), oldest complete group first."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "group"}

    def check(self, group_size: int, rows_per_step: int, batch_size: int) -> None:
        if batch_size < group_size:
            raise ValueError(f"batch_size={batch_size} < group_size={group_size}: no whole group "
                             "fits")  # fmt: skip

    def wanted(self, st: StageState, min_rows: int, rows_per_step: int) -> int:
        return min_rows

    def available(self, st: StageState) -> int:
        if st.group_size == 1:  # the controller keeps no group index then
            return len(st.ready)
        return len(st.complete_groups) * st.group_size

    def take(self, st: StageState, batch_size: int, groups: dict[int, list[int]]) -> list[int]:
        if st.group_size == 1:
            return list(itertools.islice(st.ready, batch_size))
        out: list[int] = []
        for gid in st.complete_groups:
            rows = groups[gid]
            if len(out) + len(rows) > batch_size:
                break
            out.extend(rows)
        return out


@dataclass
class StepSampler:
    """Rows of one global step only; once the stage has taken all `rows_per_step` rows of the step,
    `get` answers at once with an empty batch ("the rest of step s" is then nothing)."""

    step: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "step", "step": self.step}

    def check(self, group_size: int, rows_per_step: int, batch_size: int) -> None:
        if not isinstance(self.step, int):
            raise ValueError(f"StepSampler needs an integer step, got {self.step!r}")
        if rows_per_step <= 0:
            raise ValueError("StepSampler needs QueueConfig.rows_per_step > 0 (rows in one step)")

    def wanted(self, st: StageState, min_rows: int, rows_per_step: int) -> int:
        return min(min_rows, rows_per_step - st.taken_by_step.get(self.step, 0))

    def available(self, st: StageState) -> int:
        return len(st.by_step.get(self.step, ()))

    def take(self, st: StageState, batch_size: int, groups: dict[int, list[int]]) -> list[int]:
        return list(itertools.islice(st.by_step.get(self.step, ()), batch_size))


@dataclass
class GroupRangeSampler:
    """Every row of the groups with ids in [first, end), answered only once all of them are ready
    for the stage, in (group id, row id) order: a batch whose content and order do not depend on
    timing, so a streaming consumer computes exactly what a sequential one would."""

    first: int
    end: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "groups", "first": self.first, "end": self.end}

    def check(self, group_size: int, rows_per_step: int, batch_size: int) -> None:
        if not (isinstance(self.first, int) and isinstance(self.end, int)
                and self.first < self.end):
            raise ValueError(f"GroupRangeSampler needs integers first < end, got "
                             f"[{self.first!r}, {self.end!r})")
        if group_size == 1:
            raise ValueError("GroupRangeSampler needs QueueConfig.group_size > 1")
        if (self.end - self.first) * group_size > batch_size:
            raise ValueError(f"groups [{self.first}, {self.end}) hold "
                             f"{(self.end - self.first) * group_size} rows > batch_size={batch_size}")

    def wanted(self, st: StageState, min_rows: int, rows_per_step: int) -> int:
        return 1  # available() is all or nothing

    def available(self, st: StageState) -> int:
        complete = all(g in st.complete_groups for g in range(self.first, self.end))
        return (self.end - self.first) * st.group_size if complete else 0

    def take(self, st: StageState, batch_size: int, groups: dict[int, list[int]]) -> list[int]:
        return [r for g in range(self.first, self.end) for r in sorted(groups[g])]


_SAMPLERS: dict[str, type] = {"fifo": FifoSampler, "group": GroupSampler, "step": StepSampler,
                              "groups": GroupRangeSampler}


def sampler_from_dict(d: dict[str, Any]) -> Sampler:
    kind = d.get("kind")
    if kind not in _SAMPLERS:
        raise ValueError(f"sampler kind={kind!r}; allowed: {list(_SAMPLERS)}")
    if kind == "step":
        if not isinstance(d.get("step"), int):
            raise ValueError(f"step sampler needs an integer 'step', got {d.get('step')!r}")
        return StepSampler(step=d["step"])
    if kind == "groups":
        if not (isinstance(d.get("first"), int) and isinstance(d.get("end"), int)
                and d["first"] < d["end"]):
            raise ValueError(f"groups sampler needs integers first < end, got {d!r}")
        return GroupRangeSampler(first=d["first"], end=d["end"])
    return _SAMPLERS[kind]()


def balance_by_tokens(row_ids: list[int], num_tokens: list[int], num_parts: int) -> list[list[int]]:
    """Split rows into `num_parts` lists whose sizes differ by at most one and whose token sums are
    close: longest row first onto the lightest part that still has room (LPT with a count cap)."""
    n = len(row_ids)
    caps = [n // num_parts + (1 if p < n % num_parts else 0) for p in range(num_parts)]
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    heap = [(0, p) for p in range(num_parts) if caps[p] > 0]
    heapq.heapify(heap)
    for tok, rid in sorted(zip(num_tokens, row_ids, strict=True), key=lambda t: (-t[0], t[1])):
        load, p = heapq.heappop(heap)
        parts[p].append(rid)
        if len(parts[p]) < caps[p]:
            heapq.heappush(heap, (load + tok, p))
    return parts
