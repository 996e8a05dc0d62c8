"""Storage units: the columns a rank produced, held where they were produced until freed.

Two implementations of one small protocol:
- `MemoryStorage` keeps the producer's tensors by reference: reading rows that were put together
  returns a view (zero-copy within one process).
- `SharedMemoryStorage` copies each column into a fixed-stride slab mapped from a file in /dev/shm
  (`torch.from_file(shared=True)`), one slot per row, so any process on the host can map the slab
  and gather rows without a message to the owner. Chosen over `multiprocessing.shared_memory`,
  whose resource tracker unlinks segments when an attaching process exits.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import itertools
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from asyncflow.queue.schema import ColumnSpec, Ragged, Schema

ColumnValue = torch.Tensor | Ragged
"""A column of a batch: dense `[B, *shape]`, or `Ragged` values + offsets for ragged columns."""


def split_rows(
    spec: ColumnSpec, value: torch.Tensor | Ragged | list[torch.Tensor]
) -> list[torch.Tensor]:
    """Rows of one column as a list of per-row tensors (checked against the schema)."""
    if isinstance(value, Ragged):
        rows = value.rows()
    elif isinstance(value, torch.Tensor):
        if spec.ragged:
            raise ValueError(
                f"column {spec.name!r} is ragged: pass a list of per-row tensors or a Ragged, "
                f"not one tensor of shape {list(value.shape)}"
            )
        if value.dim() != len(spec.shape) + 1:
            raise ValueError(
                f"column {spec.name!r}: batch shape {list(value.shape)} contradicts schema "
                f"[B, *{spec.shape}]"
            )
        rows = list(value.unbind(0))
    else:
        rows = list(value)
    for r in rows:
        if not isinstance(r, torch.Tensor):
            raise ValueError(f"column {spec.name!r}: rows must be tensors, got {type(r).__name__}")
        spec.check(r)
    return rows


def as_ragged(spec: ColumnSpec, value: Ragged | list[torch.Tensor]) -> Ragged:
    """A ragged column's rows as one checked `Ragged`. A `Ragged` is checked as a whole (dtype,
    trailing shape, every length <= the schema's), not row by row: puts of many short rows (the
    prompts of a step) stay a handful of tensor ops."""
    if not isinstance(value, Ragged):
        return assemble(spec, split_rows(spec, value))  # type: ignore[return-value]
    off = value.offsets
    if off.dtype != torch.int64 or off.dim() != 1 or off.numel() < 1:
        raise ValueError(f"column {spec.name!r}: Ragged offsets must be int64 [B+1]")
    lens = value.lengths
    if int(off[0]) != 0 or int(off[-1]) != value.values.shape[0] or bool((lens < 0).any()):
        raise ValueError(
            f"column {spec.name!r}: Ragged offsets {off.tolist()[:8]} do not cover "
            f"its {value.values.shape[0]} values in order"
        )
    spec.check(value.values[:0])  # dtype, device and trailing shape, on a row of length 0
    longest = int(lens.max()) if len(value) else 0
    if longest > spec.shape[0]:
        raise ValueError(
            f"column {spec.name!r}: a row of length {longest} contradicts schema "
            f"[<= {spec.shape[0]}, *{spec.shape[1:]}]"
        )
    return value


def assemble(spec: ColumnSpec, rows: list[torch.Tensor]) -> ColumnValue:
    if spec.ragged:
        return Ragged.from_rows(rows, torch.empty((0, *spec.shape[1:]), dtype=spec.torch_dtype))
    if not rows:
        return torch.empty((0, *spec.shape), dtype=spec.torch_dtype)
    return torch.stack(rows)


class Storage(Protocol):
    """One rank's storage unit. Slots are the handles the controller records per (row, rank)."""

    def write(self, row_ids: list[int], columns: dict[str, Any]) -> list[int]:
        """Store columns, each a dense `[B, ...]` batch or, for ragged columns, a `Ragged` that
        `as_ragged` checked (the client does both); returns slots."""
        ...

    def read(self, column: str, slots: list[int], out: torch.Tensor | None = None) -> ColumnValue:
        """The rows at `slots`, in order. For a fixed-shape column, `out` (`[len(slots), *shape]`)
        receives them and is returned: a data plane gathers straight into its message."""
        ...

    def discard(self, row_ids: list[int], columns: list[str]) -> None:
        """Undo a `write` whose commit was refused."""
        ...

    def free(self, entries: list[tuple[int, int]]) -> None:
        """Release (slot, row id) pairs of freed rows; entries whose slot moved on are skipped."""
        ...


class MemoryStorage:
    """Keeps references to the put values (a tensor, or the `Ragged` of a ragged column). Slot =
    row id; per column, row -> the put's value and the row's index in it. Plain ints, not a tuple
    per row: per-row container objects made every put feed the cyclic garbage collector, whose
    full passes cost ~15x the write itself on a process that holds torch."""

    def __init__(self, schema: Schema):
        self.schema = schema
        names = [c.name for c in schema.columns]
        self._base: dict[str, dict[int, ColumnValue]] = {n: {} for n in names}
        self._start: dict[str, dict[int, int]] = {n: {} for n in names}

    def write(self, row_ids: list[int], columns: dict[str, Any]) -> list[int]:
        for name in columns:
            if not self._base[name].keys().isdisjoint(row_ids):
                _check_write_once(name, [r for r in row_ids if r in self._base[name]])
        for name, value in columns.items():
            if len(value) != len(row_ids):  # e.g. a restored snapshot's entry
                raise ValueError(f"column {name!r} has {len(value)} rows for {len(row_ids)} "
                                 "row ids")
        for name, value in columns.items():  # dict updates from iterators: no Python loop per row
            self._base[name].update(dict.fromkeys(row_ids, value))
            self._start[name].update(zip(row_ids, range(len(row_ids)), strict=True))
        return list(row_ids)

    def read(self, column: str, slots: list[int], out: torch.Tensor | None = None) -> ColumnValue:
        spec = self.schema.spec(column)
        if not slots:
            if spec.ragged or out is None:
                return assemble(spec, [])
            return out
        base, start = self._base[column], self._start[column]
        bases, starts = list(map(base.__getitem__, slots)), list(map(start.__getitem__, slots))
        pieces, pos = [], 0
        for _, same in itertools.groupby(bases, key=id):  # rows of one put, side by side
            n = len(list(same))
            put, idx = bases[pos], starts[pos : pos + n]
            if idx == list(range(idx[0], idx[0] + n)):  # a view
                pieces.append(put.slice_rows(idx[0], idx[0] + n) if spec.ragged
                              else put.narrow(0, idx[0], n))
            else:  # one gather
                pieces.append(put.take(idx) if spec.ragged
                              else put.index_select(0, torch.tensor(idx)))
            pos += n
        # Python work per put, not per row; rows put together and read in order: zero-copy
        if len(pieces) == 1 and out is None:
            return pieces[0]
        if spec.ragged:
            return Ragged.from_lengths(torch.cat([p.values for p in pieces]),
                                       torch.cat([p.lengths for p in pieces]))
        return torch.cat(pieces, out=out)

    def discard(self, row_ids: list[int], columns: list[str]) -> None:
        absent = [None] * len(row_ids)
        for name in columns:
            for d in (self._base[name], self._start[name]):
                collections.deque(map(d.pop, row_ids, absent), maxlen=0)  # pops at C speed

    def free(self, entries: list[tuple[int, int]]) -> None:
        self.discard([rid for _, rid in entries], list(self._base))

    def num_rows(self) -> int:
        return len({r for col in self._base.values() for r in col})


def _check_write_once(name: str, dup: list[int]) -> None:
    if dup:
        raise ValueError(
            f"column {name!r} of rows {dup[:8]} is already stored; columns are write-once"
        )


def unlink_session(session: str) -> None:
    """Remove every slab file of a queue session on this host (ranks that died left theirs)."""
    for path in glob.glob(f"/dev/shm/asyncflow-{session}-*"):
        with contextlib.suppress(FileNotFoundError):  # a rank closing concurrently
            os.unlink(path)


def mark_owner(session: str) -> None:
    """Record which process hosts `session`, so a later run can tell its slabs are stale; the
    marker matches `unlink_session`'s pattern and goes with the slabs."""
    path = f"/dev/shm/asyncflow-{session}-owner"
    with contextlib.suppress(OSError):  # no /dev/shm: nothing to clean up later either
        Path(path).write_text(str(os.getpid()))


def unlink_stale_sessions() -> list[str]:
    """Remove the slabs of sessions whose host process is gone (SIGKILLed ranks leave theirs
    behind); returns the sessions removed. Sessions of live processes are left alone."""
    removed = []
    for marker in glob.glob("/dev/shm/asyncflow-*-owner"):
        session = Path(marker).name.removeprefix("asyncflow-").removesuffix("-owner")
        try:
            os.kill(int(Path(marker).read_text()), 0)
            continue  # alive (or a pid reused by another process: leave it, to be safe)
        except ProcessLookupError:
            pass
        except (OSError, ValueError):  # unreadable marker, or a process of another user
            continue
        unlink_session(session)
        removed.append(session)
    return removed


def slab_path(session: str, rank: int, column: str, suffix: str = "") -> str:
    return f"/dev/shm/asyncflow-{session}-r{rank}-{column}{suffix}"


class Slabs:
    """Maps one rank's column slabs (`[num_slots, *shape]`, plus int64 lengths for ragged columns);
    used writable by the owner and read-only in spirit by readers on the same host."""

    def __init__(self, schema: Schema, session: str, rank: int, num_slots: int, create: bool):
        self.schema, self.session, self.rank, self.num_slots = schema, session, rank, num_slots
        self.create = create
        self.data: dict[str, torch.Tensor] = {}
        self.lengths: dict[str, torch.Tensor] = {}

    def map(self, column: str) -> torch.Tensor:
        if column not in self.data:
            spec = self.schema.spec(column)
            path = slab_path(self.session, self.rank, column)
            if not self.create and not os.path.exists(path):
                raise ValueError(
                    f"no shared-memory slab {path}: rank {self.rank} is not on this host (or "
                    f"never stored {column!r}); use transport='dist' across hosts"
                )
            flat = torch.from_file(
                path, shared=True, size=self.num_slots * spec.row_numel, dtype=spec.torch_dtype
            )
            self.data[column] = flat.view(self.num_slots, *spec.shape)
            if spec.ragged:
                lpath = slab_path(self.session, self.rank, column, ".len")
                self.lengths[column] = torch.from_file(
                    lpath, shared=True, size=self.num_slots, dtype=torch.int64
                )
        return self.data[column]

    def read(self, column: str, slots: list[int], out: torch.Tensor | None = None) -> ColumnValue:
        slab = self.map(column)
        spec = self.schema.spec(column)
        idx = torch.tensor(slots, dtype=torch.int64)
        if not spec.ragged:
            return slab.index_select(0, idx) if out is None else torch.index_select(slab, 0, idx,
                                                                                    out=out)
        # vectorised: gather the rows' slots, keep each row's first `length` entries
        lens = self.lengths[column].index_select(0, idx)
        width = int(lens.max()) if len(slots) else 0
        return Ragged.from_padded(slab.narrow(1, 0, width).index_select(0, idx), lens)

    def paths(self) -> list[str]:
        out = [slab_path(self.session, self.rank, c) for c in self.data]
        return out + [slab_path(self.session, self.rank, c, ".len") for c in self.lengths]


class SharedMemoryStorage:
    """Fixed-stride slabs in /dev/shm, one slot per row stored on this rank; `num_slots` is the
    queue's `capacity_rows`, so slots never run out while freed slots are returned promptly."""

    def __init__(self, schema: Schema, session: str, rank: int, num_slots: int):
        self.schema = schema
        self.slabs = Slabs(schema, session, rank, num_slots, create=True)
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[int, int] = {}
        self._row_of: dict[int, int] = {}
        self._stored: dict[str, set[int]] = {c.name: set() for c in schema.columns}
        """Column -> rows holding it here: set operations per batch, not a set per row."""

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def write(self, row_ids: list[int], columns: dict[str, Any]) -> list[int]:
        for name in columns:
            stored = self._stored[name]
            if not stored.isdisjoint(row_ids):
                _check_write_once(name, [r for r in row_ids if r in stored])
        slot_of, free = self._slot_of, self._free_slots
        new = [r for r in dict.fromkeys(row_ids) if r not in slot_of]
        if len(new) > len(free):
            raise MemoryError(f"storage full: {len(new)} slots needed, {len(free)} free")
        if new:  # the first new row takes the last free slot, as one pop per row would
            taken = free[-len(new):][::-1]
            del free[-len(new):]
            slot_of.update(zip(new, taken, strict=True))
            self._row_of.update(zip(taken, new, strict=True))
        slots = [slot_of[r] for r in row_ids]
        idx = torch.tensor(slots, dtype=torch.int64)
        for name, value in columns.items():
            slab = self.slabs.map(name)
            if not self.schema.spec(name).ragged:
                if slots == list(range(slots[0], slots[0] + len(slots))):
                    slab[slots[0] : slots[0] + len(slots)].copy_(value)
                else:
                    slab.index_copy_(0, idx, value)
            else:  # ragged: pad to the longest row, then one indexed copy (no per-row loop)
                padded = value.padded()
                slab.narrow(1, 0, padded.shape[1]).index_copy_(0, idx, padded)
                self.slabs.lengths[name].index_copy_(0, idx, value.lengths)
            self._stored[name].update(row_ids)
        return slots

    def read(self, column: str, slots: list[int], out: torch.Tensor | None = None) -> ColumnValue:
        return self.slabs.read(column, slots, out)

    def discard(self, row_ids: list[int], columns: list[str]) -> None:
        for name in columns:
            self._stored[name].difference_update(row_ids)
        stored = self._stored.values()
        self.free([(self._slot_of[r], r) for r in row_ids
                   if r in self._slot_of and not any(r in rows for rows in stored)])

    def free(self, entries: list[tuple[int, int]]) -> None:
        gone = []
        for s, rid in entries:
            if self._row_of.get(s) != rid:
                continue
            del self._row_of[s]
            del self._slot_of[rid]
            self._free_slots.append(s)
            gone.append(rid)
        for rows in self._stored.values():
            rows.difference_update(gone)

    def close(self) -> None:
        """Unlink the slab files; mappings already open elsewhere stay valid until dropped."""
        for p in self.slabs.paths():
            # the queue's host unlinks every slab of the session when it closes, maybe now
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
