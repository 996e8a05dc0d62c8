"""What every stage uses: `put` columns of rows, `get` a micro-batch for a stage, `ack` it.

```
  stage A (rank 0)                       controller (host rank)              stage B (rank 1)
  put(cols) --reserve--------------------> capacity wait, row ids
            write to own storage unit
            --commit(cols, slots)--------> ready sets += rows, wake B ----+
                                                                          v
                                           <----get(B, stage, sampler)--- parked on stage cond
                                           lease + (owner, slot) per row ->
  storage <----------- fetch: local | /dev/shm map | gloo send/recv, one per owner ----- B
                                           <----ack(lease)--------------- rows consumed by B;
  storage frees slots <-- freed list on the next reply --- rows freed when every stage consumed
```

Shutdown order: stop the stage loops (no `get`/`put` in flight), `client.close()` on every rank
(collective when the transport is `dist`), then `server.close()` on the host rank. A client that
disappears without closing has its leases returned when its control connection drops.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from asyncflow.queue.control import ControlPlane, Freed, LocalControl, RemoteControl
from asyncflow.queue.controller import Controller, Grant
from asyncflow.queue.samplers import FifoSampler, Sampler
from asyncflow.queue.schema import QueueConfig, Ragged, Schema
from asyncflow.queue.server import ControllerServer
from asyncflow.queue.storage import (
    ColumnValue,
    MemoryStorage,
    SharedMemoryStorage,
    Storage,
    as_ragged,
    assemble,
    split_rows,
)
from asyncflow.queue.transport import (
    DistTransport,
    LocalTransport,
    Pending,
    ShmTransport,
    Transport,
)

T = TypeVar("T")

Pulls = list[tuple[str, list[int], list[int] | None]]
"""Columns to pull from one owner: (column, slots, positions of those rows in the batch, or None
when the owner holds every row of the column, in batch order)."""


@dataclass
class Batch:
    """A leased micro-batch: rows, their columns (dense `[B, ...]` or `Ragged`) and metadata."""

    row_ids: list[int]
    columns: dict[str, ColumnValue]
    lease_id: int = -1
    steps: list[int] = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    exhausted: bool = False
    """Empty because a step sampler's step has nothing left for this stage (not a timeout)."""
    num_done: int = 0
    """Rows already given up by `put(..., ack=batch)`; with the last one the lease is over
    (`lease_id` becomes -1, so `ack` and `nack` have nothing left to do)."""

    def __len__(self) -> int:
        return len(self.row_ids)


class QueueClient:
    """One rank's handle on the queue: its storage unit, its transports and its control link."""

    def __init__(
        self,
        cfg: QueueConfig,
        rank: int,
        control: ControlPlane,
        group: dist.ProcessGroup | None = None,
    ):
        self.cfg, self.rank, self.control = cfg, rank, control
        self.schema = Schema(cfg.columns)
        self._lock = threading.Lock()
        self._slots_freed = threading.Condition(self._lock)
        if cfg.transport == "shm":
            self.storage: Storage = SharedMemoryStorage(
                self.schema, control.session, rank, cfg.capacity_rows
            )
            self._remote: Transport | None = ShmTransport(
                self.schema, control.session, cfg.capacity_rows
            )
        else:
            self.storage = MemoryStorage(self.schema)
            self._remote = None
            if cfg.transport == "dist":
                if group is None:
                    raise ValueError(
                        "transport='dist' needs `group`: a process group for the data plane"
                    )
                self._remote = DistTransport(self.schema, self.storage, group)
        self._local = LocalTransport(self.storage)

    def _reply(self, answer: tuple[T, Freed]) -> T:
        """The result of a control call; the freed rows riding on it go back to the storage."""
        result, freed = answer
        if freed:
            with self._lock:
                self.storage.free(freed)
                self._slots_freed.notify_all()
        return result

    def _write(self, rows: list[int], data: dict[str, Any], timeout_s: float) -> list[int]:
        """Write to the storage unit. Slots equal capacity, so a full storage only means that
        some freed rows are not applied yet: held by the controller (fetched here) or riding on
        another thread's reply (waited for, woken when that thread applies them)."""
        with self._lock:
            try:
                return self.storage.write(rows, data)
            except MemoryError:
                pass
        self._reply(self.control.take_freed())
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                try:
                    return self.storage.write(rows, data)
                except MemoryError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    self._slots_freed.wait(left)

    # ------------------------------------------------------------------ put

    def put(
        self,
        columns: dict[str, torch.Tensor | Ragged | list[torch.Tensor]],
        rows: list[int] | None = None,
        step: int = 0,
        group_ids: list[int] | None = None,
        policy_versions: list[int] | None = None,
        num_tokens: list[int] | None = None,
        timeout_s: float | None = None,
        ack: Batch | None = None,
    ) -> list[int]:
        """Store columns of new rows (`rows=None`: blocks while the queue is full) or new columns
        of existing rows; visible to stages only once all bytes are stored. Returns the row ids.
        The queue takes ownership of the tensors: do not modify them afterwards.
        `ack`: the batch these rows came in; its stage has consumed them as soon as this output
        is visible, in one step of the controller, so a checkpoint never holds the output of a
        row that it would deliver to the stage again. Once every row of the batch is put this
        way its lease is over; `ack(batch)` ends it earlier, with the rows not put."""
        if not columns:
            raise ValueError("put needs at least one column")
        if ack is not None and rows is None:
            raise ValueError("put(ack=batch) needs rows=: the batch's rows this output completes")
        data, num_rows = self._rows_of(columns)
        if rows is not None and len(rows) != num_rows:
            raise ValueError(f"len(rows)={len(rows)} but the columns have {num_rows} rows")
        if rows is not None and len(set(rows)) != len(rows):
            raise ValueError(f"rows contain duplicates: {rows}")
        if num_rows == 0:
            raise ValueError("put of zero rows")
        timeout = timeout_s if timeout_s is not None else self.cfg.timeout_s
        reserved = rows is None
        if rows is None:
            rows = self._reply(self.control.reserve(num_rows, step, group_ids, timeout))
        try:
            slots = self._write(rows, data, timeout)
            try:
                self._reply(self.control.commit(
                    list(rows), list(data), slots, policy_versions, num_tokens,
                    ack.lease_id if ack is not None else None,
                ))  # fmt: skip
            except ValueError:
                with self._lock:
                    self.storage.discard(list(rows), list(data))
                raise
        except BaseException:
            if reserved:  # the reservation would hold capacity until this client disconnects
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    self._reply(self.control.release(list(rows)))
            raise
        if ack is not None:
            ack.num_done += len(rows)
            if ack.num_done == len(ack.row_ids):
                ack.lease_id = -1  # the controller ended the lease with its last row
        return list(rows)

    def _rows_of(self, columns: dict[str, torch.Tensor | Ragged | list[torch.Tensor]]
                 ) -> tuple[dict[str, Any], int]:  # fmt: skip
        """Each column checked against the schema and in the form the storage writes (dense
        `[B, ...]` or `Ragged`), and the number of rows they all have."""
        data: dict[str, Any] = {}
        num_rows = None
        for name, value in columns.items():
            spec = self.schema.spec(name)
            if isinstance(value, torch.Tensor) and not spec.ragged:
                if list(value.shape[1:]) != spec.shape or value.dim() != len(spec.shape) + 1:
                    raise ValueError(
                        f"column {name!r}: batch shape {list(value.shape)} contradicts schema [B, *{spec.shape}]"
                    )
                spec.check(value[0] if value.shape[0] else value.new_empty(spec.shape))
                data[name] = value
            else:
                data[name] = (as_ragged(spec, value) if spec.ragged
                              else assemble(spec, split_rows(spec, value)))
            n = len(data[name])
            if num_rows is not None and n != num_rows:
                raise ValueError(f"column {name!r} has {n} rows, other columns have {num_rows}")
            num_rows = n
        assert num_rows is not None, "put checked that there is a column"
        return data, num_rows

    # ------------------------------------------------------------------ get

    def get(
        self,
        stage: str,
        batch_size: int,
        timeout_s: float | None = None,
        sampler: Sampler | None = None,
        min_rows: int = 1,
        columns: list[str] | None = None,
    ) -> Batch:
        """Lease up to `batch_size` rows whose columns `stage` needs are all ready and that the
        stage has not consumed; blocks until `min_rows` are available. Empty batch on timeout."""
        grant = self._reply(self.control.get(stage, batch_size, timeout_s,
                                             sampler or FifoSampler(), min_rows, columns))
        return self._fetch(grant)

    def get_balanced(
        self,
        stage: str,
        dp_rank: int,
        dp_size: int,
        batch_size: int,
        timeout_s: float | None = None,
        sampler: Sampler | None = None,
        min_rows: int = 1,
        columns: list[str] | None = None,
    ) -> Batch:
        """Collective over the `dp_size` ranks of a data-parallel mesh: each call is answered
        together with the same call of the other ranks, token-balanced, equal row counts (+-1)."""
        grant = self._reply(self.control.get_balanced(
            stage, dp_rank, dp_size, batch_size, timeout_s, sampler or FifoSampler(), min_rows,
            columns,
        ))  # fmt: skip
        return self._fetch(grant)

    def _fetch(self, grant: Grant) -> Batch:
        """The grant's rows with their columns, pulled with one transfer per owner, every transfer
        started before any is waited for. If a transfer fails the lease is given back before the
        error propagates."""
        columns: dict[str, ColumnValue] = {}
        if grant.row_ids:
            started = self._start(_by_owner(grant.locations), grant.lease_id)
            pieces: dict[str, list[tuple[list[int] | None, ColumnValue]]] = {
                c: [] for c in grant.locations
            }
            error: BaseException | None = None
            for reqs, pending in started:  # every transfer ends before the lease goes back
                try:
                    for (col, _, positions), v in zip(reqs, pending(), strict=True):
                        pieces[col].append((positions, v))
                except (RuntimeError, OSError) as e:
                    error = error or e
            if error is not None:
                self.nack_lease(grant.lease_id)
                raise error
            columns = self._assemble(len(grant.row_ids), pieces)
        return Batch(grant.row_ids, columns, grant.lease_id, grant.steps, grant.group_ids,
                     grant.policy_versions, grant.num_tokens, grant.exhausted)  # fmt: skip

    def _start(self, by_owner: dict[int, Pulls], lease_id: int
               ) -> list[tuple[Pulls, Pending]]:  # fmt: skip
        """Start one transfer per owner. If one cannot start, those started are finished (an
        owner may be sending) and the lease is given back before the error propagates."""
        started: list[tuple[Pulls, Pending]] = []
        try:
            for owner, reqs in by_owner.items():
                transport = self._local if owner == self.rank else self._remote
                if transport is None:
                    raise ValueError(
                        f"row owned by rank {owner} but transport='local' reaches only this rank"
                    )
                with self._lock if owner == self.rank else contextlib.nullcontext():
                    started.append((reqs, transport.start(owner, [(c, s) for c, s, _ in reqs])))
        except (ValueError, RuntimeError, OSError):
            for _, pending in started:  # finish what was started: its owner may be sending it
                with contextlib.suppress(RuntimeError, OSError):
                    pending()
            self.nack_lease(lease_id)  # owner unreachable: give the rows back, then fail
            raise
        return started

    def _assemble(self, num_rows: int,
                  pieces: dict[str, list[tuple[list[int] | None, ColumnValue]]]
                  ) -> dict[str, ColumnValue]:  # fmt: skip
        """One value per column; `positions` None means the piece holds every row in order."""
        out: dict[str, ColumnValue] = {}
        for col, parts in pieces.items():
            if len(parts) == 1:
                out[col] = parts[0][1]
                continue
            spec = self.schema.spec(col)
            rows: list[torch.Tensor | None] = [None] * num_rows
            for positions, v in parts:
                assert positions is not None, "a column split across owners has positions"
                values = v.rows() if isinstance(v, Ragged) else v.unbind(0)
                for p, r in zip(positions, values, strict=True):
                    rows[p] = r
            out[col] = assemble(spec, rows)  # type: ignore[arg-type]
        return out

    def ack(self, batch: Batch) -> None:
        """The batch's rows are consumed by its stage (each row reaches each stage exactly once)."""
        if batch.lease_id >= 0:
            self._reply(self.control.ack(batch.lease_id))

    def nack(self, batch: Batch) -> None:
        """Give the batch back: its rows are redelivered to the stage first."""
        self.nack_lease(batch.lease_id)

    def nack_lease(self, lease_id: int) -> None:
        if lease_id >= 0:
            self._reply(self.control.nack(lease_id))

    def stats(self) -> dict[str, int]:
        return self._reply(self.control.stats())

    # ------------------------------------------------------------------ state, shutdown

    def taken(self, stage: str) -> dict[int, int]:
        """Rows of each step `stage` has leased or consumed (what a resumed stage has done)."""
        return self._reply(self.control.taken(stage))

    def snapshot(self) -> dict[str, Any]:
        """The whole queue: the controller's metadata and every stored column, pulled from its
        owners. Consistent as long as no row is freed meanwhile (stored columns are write-once,
        and a checkpoint takes it while the last stage, train, is between steps). Plain data and
        tensors only (`torch.load(weights_only=True)` reads it)."""
        meta = self._reply(self.control.state_dict())
        names = [c.name for c in self.schema.columns]
        columns: dict[str, Any] = {}
        for c, name in enumerate(names):
            rows = [r[0] for r in meta["rows"] if r[5] >> c & 1]
            if not rows:
                continue
            locs = {r[0]: next((o, s) for ci, o, s in r[7] if ci == c) for r in meta["rows"]
                    if r[5] >> c & 1}
            owners, slots = zip(*[locs[r] for r in rows], strict=True)
            grant = Grant(-1, rows, [], [], [], [], {name: (list(owners), list(slots))})
            value = self._fetch(grant).columns[name]
            columns[name] = ({"row_ids": rows, "values": value.values, "offsets": value.offsets}
                             if isinstance(value, Ragged) else {"row_ids": rows, "values": value})
        return {"meta": meta, "columns": columns}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Load a `snapshot` into an empty queue: every column goes to this rank's storage, the
        metadata (pointing at it) to the controller; leases of the snapshot are redelivered."""
        meta = snapshot["meta"]
        where: dict[tuple[int, int], int] = {}  # (row, column index) -> slot here
        for name, entry in snapshot["columns"].items():
            rows = entry["row_ids"]
            value = (Ragged(entry["values"], entry["offsets"]) if "offsets" in entry
                     else entry["values"])
            spec = self.schema.spec(name)
            data = (as_ragged(spec, value) if spec.ragged
                    else assemble(spec, split_rows(spec, value)))
            c = self.schema.index[name]
            with self._lock:
                slots = self.storage.write(rows, {name: data})
            where.update({(r, c): s for r, s in zip(rows, slots, strict=True)})
        rows = [[*r[:7], [[c, self.rank, where[(r[0], c)]] for c, _, _ in r[7]]]
                for r in meta["rows"]]
        self._reply(self.control.load_state_dict({**meta, "rows": rows, "freed": []}))

    def close(self) -> None:
        """Collective when transport='dist'. Unlinks this rank's shared-memory slabs."""
        if self._remote is not None:
            self._remote.close()
        self.abort()

    def abort(self) -> None:
        """Error-path close, never collective: drop the control links (the controller returns
        this client's leases) and unlink this rank's shared-memory slabs."""
        self.control.close()
        if isinstance(self.storage, SharedMemoryStorage):
            self.storage.close()


def _by_owner(locations: dict[str, tuple[list[int], list[int]]]) -> dict[int, Pulls]:
    """What to pull from each owner; columns whose rows live on several owners are split."""
    by_owner: dict[int, Pulls] = {}
    for col, (owners, slots) in locations.items():
        if owners.count(owners[0]) == len(owners):  # the common case: one owner
            by_owner.setdefault(owners[0], []).append((col, slots, None))
            continue
        per: dict[int, tuple[list[int], list[int]]] = {}
        for pos, (owner, slot) in enumerate(zip(owners, slots, strict=True)):
            p = per.setdefault(owner, ([], []))
            p[0].append(slot)
            p[1].append(pos)
        for owner, (owner_slots, positions) in per.items():
            by_owner.setdefault(owner, []).append((col, owner_slots, positions))
    return by_owner


def serve(cfg: QueueConfig, controller: Controller | None = None) -> ControllerServer:
    """Host the controller (on one rank) at `cfg.host:cfg.port`."""
    return ControllerServer(controller or Controller(cfg), cfg.host, cfg.port, cfg.secret)


def connect(
    cfg: QueueConfig,
    rank: int,
    address: tuple[str, int] | None = None,
    controller: Controller | None = None,
    group: dist.ProcessGroup | None = None,
) -> QueueClient:
    """A client for `rank`: in-process when `controller` is given, else over the socket at
    `address` (default `cfg.host:cfg.port`). `group` is the data-plane group for transport='dist'."""
    if controller is not None:
        control: ControlPlane = LocalControl(controller, rank)
    else:
        control = RemoteControl(address or (cfg.host, cfg.port), rank, cfg.timeout_s,
                                cfg.secret)
    return QueueClient(cfg, rank, control, group)
