"""The controller's saved state: its rows as plain lists (`state_dict`), and the checks and the
load of such a state (`parse`, then `load`). No lock here: the controller holds its lock around
`state_dict` and `load`; `parse` reads only the state it is given."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from asyncflow.queue.metadata import RowMeta
from asyncflow.queue.rows import RowTable, as_ints


@dataclass
class SavedState:
    """A checked state, ready to load."""

    rows: dict[int, RowMeta]
    orders: dict[str, list[int]]
    """stage -> its ready rows, in order."""
    taken: dict[str, dict[int, int]]
    freed: dict[int, list[tuple[int, int]]]
    next_row_id: int


def state_dict(table: RowTable) -> dict[str, Any]:
    """Metadata as plain lists. Leased rows are saved as not consumed (redelivered after a
    restore). Rows reserved but never written are not saved; the ids of those after the last
    written row are handed out again after a restore, so a re-run producer gets the row ids
    it got the first time. An id below a written one is not: another row may have had it."""
    rows = []
    next_row_id = table.next_row_id
    for rid, m in table.rows.items():
        if m.ready_mask == 0:
            if rid >= table.committed_below:
                next_row_id = min(next_row_id, rid)
            continue
        locs = [[c, o, s] for c, (o, s) in m.locations.items()]
        rows.append([rid, m.step, m.group_id, m.policy_version, m.num_tokens, m.ready_mask,
                     m.consumed_mask, locs])  # fmt: skip
    orders = {}
    taken = {}
    for st in table.stages:
        leased = [r for lease in table.leases.values() if lease.stage == st.index
                  for r in lease.row_ids]  # fmt: skip
        orders[st.name] = leased + list(st.ready)
        t = dict(st.taken_by_step)
        for r in leased:
            t[table.rows[r].step] -= 1
        taken[st.name] = [[k, v] for k, v in t.items()]
    return {
        "next_row_id": next_row_id,
        "rows": rows,
        "ready_order": orders,
        "taken_by_step": taken,
        "freed": [[o, [list(e) for e in s]] for o, s in table.freed.items()],
    }


def parse(state: dict[str, Any], table: RowTable) -> SavedState:
    """Read a `state_dict` whole, for the stages and groups of `table`; a malformed one is
    refused (ValueError). A key this version no longer writes (`num_dropped_stale`) is ignored."""
    try:
        rows: dict[int, RowMeta] = {}
        for rid, step, gid, ver, tok, ready, consumed, locs in state["rows"]:
            m = RowMeta(*as_ints("row", [step, gid, ver, tok, ready, consumed]))
            m.locations = {c: (o, s) for c, o, s in (as_ints("location", x) for x in locs)}
            rows[operator.index(rid)] = m
        orders = {st.name: as_ints("ready_order", state["ready_order"][st.name])
                  for st in table.stages}  # fmt: skip
        taken = {st.name: dict(as_ints("taken_by_step", kv)
                               for kv in state["taken_by_step"][st.name])
                 for st in table.stages}  # fmt: skip
        freed = {operator.index(o): [tuple(as_ints("freed", e)) for e in es]
                 for o, es in state["freed"]}  # fmt: skip
        next_row_id = operator.index(state["next_row_id"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a queue state: {type(e).__name__}: {e}") from None
    _check_orders(rows, orders, table)
    # a state written before row ids stopped being reused may name a stored id: never again
    next_row_id = max(next_row_id, max(rows, default=-1) + 1)
    ungrouped = [rid for rid, m in rows.items() if m.group_id < 0]
    if table.group_size > 1 and ungrouped:
        raise ValueError(f"rows {ungrouped[:8]} of this state have negative group ids, which "
                         f"now mean 'no group'; group_size={table.group_size} needs "
                         "groups")  # fmt: skip
    return SavedState(rows, orders, taken, freed, next_row_id)  # type: ignore[arg-type]


def _check_orders(rows: dict[int, RowMeta], orders: dict[str, list[int]], table: RowTable) -> None:
    """Every stage lists stored rows, each once, that are ready for it and not consumed by it,
    and has consumed only rows that hold every column it needs."""
    unknown = [r for order in orders.values() for r in order if r not in rows]
    if unknown:
        raise ValueError(f"not a queue state: ready rows {unknown[:8]} are not stored")
    num_columns = len(table.schema.columns)
    for st in table.stages:
        order, needs = orders[st.name], st.needs_mask
        bad = [r for r in order if rows[r].ready_mask & needs != needs
               or rows[r].consumed_mask >> st.index & 1
               or any(c not in rows[r].locations for c in range(num_columns)
                      if needs >> c & 1)]  # fmt: skip
        if bad or len(set(order)) != len(order):
            raise ValueError(f"not a queue state: stage {st.name!r} lists rows {bad[:8]} "
                             "that are not ready for it, or a row twice")  # fmt: skip
        # a stage consumes only rows it was offered (`RowTable.store` relies on it)
        early = [r for r, m in rows.items()
                 if m.consumed_mask >> st.index & 1 and m.ready_mask & needs != needs]
        if early:
            raise ValueError(f"not a queue state: stage {st.name!r} consumed rows {early[:8]} "
                             "whose columns it needs are not all stored")


def load(table: RowTable, saved: SavedState) -> None:
    """Replace every row of `table` (its leases are forgotten) with those of `saved`."""
    table.clear()
    table.next_row_id = table.committed_below = saved.next_row_id
    table.rows = saved.rows
    for rid, m in saved.rows.items():
        if m.group_id >= 0:
            table.groups.setdefault(m.group_id, []).append(rid)
    for st in table.stages:
        order = saved.orders[st.name]
        st.add_rows(order, [saved.rows[rid] for rid in order])
        st.taken_by_step = saved.taken[st.name]
    table.freed = saved.freed
