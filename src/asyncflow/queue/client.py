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

import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from asyncflow.log import get_logger
from asyncflow.queue.control import ControlPlane, LocalControl, RemoteControl
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

logger = get_logger(__name__)


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

    def _call(self, op: str, **args: Any) -> Any:
        result, freed = self.control.call(op, args)
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
        self._call("take_freed")
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
        if rows is not None and len(rows) != num_rows:
            raise ValueError(f"len(rows)={len(rows)} but the columns have {num_rows} rows")
        if rows is not None and len(set(rows)) != len(rows):
            raise ValueError(f"rows contain duplicates: {rows}")
        if num_rows == 0:
            raise ValueError("put of zero rows")
        timeout = timeout_s if timeout_s is not None else self.cfg.timeout_s
        reserved = rows is None
        if rows is None:
            rows = self._call(
                "reserve", num_rows=num_rows, step=step, group_ids=group_ids, timeout_s=timeout
            )
        try:
            slots = self._write(rows, data, timeout)
            try:
                self._call("commit", row_ids=list(rows), columns=list(data), slots=slots,
                           policy_versions=policy_versions, num_tokens=num_tokens,
                           ack_lease=ack.lease_id if ack is not None else None)  # fmt: skip
            except ValueError:
                with self._lock:
                    self.storage.discard(list(rows), list(data))
                raise
        except BaseException:
            if reserved:  # the reservation would hold capacity until this client disconnects
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    self._call("release", row_ids=list(rows))
            raise
        if ack is not None:
            ack.num_done += len(rows)
            if ack.num_done == len(ack.row_ids):
                ack.lease_id = -1  # the controller ended the lease with its last row
        return list(rows)

    # ------------------------------------------------------------------ get

    def get(
        self,
        stage: str,
        batch_size: int,
        timeout_s: float | None = None,
        sampler: Sampler | None = None,
        min_rows: int = 1,
        columns: list[str] | None = None,
        min_policy_version: int | None = None,
    ) -> Batch:
        """Lease up to `batch_size` rows whose columns `stage` needs are all ready and that the
        stage has not consumed; blocks until `min_rows` are available. Empty batch on timeout."""
        grants = self._lease(stage, batch_size, 1, timeout_s, sampler, min_rows, columns,
                             min_policy_version)  # fmt: skip
        return self._start(grants)[0]()

    def _lease(self, stage: str, batch_size: int, count: int, timeout_s: float | None,
               sampler: Sampler | None, min_rows: int, columns: list[str] | None,
               min_policy_version: int | None) -> list[Grant]:  # fmt: skip
        """Up to `count` grants from one control round trip (`Controller.get_many`)."""
        return [Grant.from_wire(g) for g in self._call(
            "get_many", stage=stage, batch_size=batch_size, count=count, timeout_s=timeout_s,
            sampler=(sampler or FifoSampler()).to_dict(), min_rows=min_rows, columns=columns,
            min_policy_version=min_policy_version,
        )]  # fmt: skip

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
        min_policy_version: int | None = None,
    ) -> Batch:
        """Collective over the `dp_size` ranks of a data-parallel mesh: each call is answered
        together with the same call of the other ranks, token-balanced, equal row counts (+-1)."""
        grant = Grant.from_wire(self._call(
            "get_balanced", stage=stage, dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size,
            timeout_s=timeout_s, sampler=(sampler or FifoSampler()).to_dict(), min_rows=min_rows,
            columns=columns, min_policy_version=min_policy_version,
        ))  # fmt: skip
        return self._start([grant])[0]()

    def stream(
        self,
        stage: str,
        batch_size: int,
        prefetch: int = 2,
        timeout_s: float | None = None,
        sampler: Sampler | None = None,
        min_rows: int = 1,
        columns: list[str] | None = None,
        min_policy_version: int | None = None,
    ) -> Iterator[Batch]:
        """Yield `get(...)` batches until one comes back empty (timeout, or the step sampler's step
        is exhausted). A background thread keeps up to `prefetch` batches leased and their
        transfers started, so control round trips and transfers overlap the caller's work. Once
        half of them are consumed it leases the missing ones in one round trip (`get_many`) and
        pulls their rows in one message per owner. The caller acks each batch; leases still ahead
        when the caller stops iterating are given back, newest first so that the queue's order is
        kept, before the iterator returns, except a `get_many` still waiting in the controller:
        what it leases is given back when it answers."""
        if prefetch < 1:
            raise ValueError(f"prefetch={prefetch}; must be >= 1")
        chunk = max(1, prefetch // 2)
        cond = threading.Condition()
        ahead: collections.deque[Callable[[], Batch] | BaseException] = collections.deque()
        stopped, leasing = [False], [False]

        def prefetcher() -> None:
            """Prefetch loop: waits until `chunk` batches of room are free in `ahead` (or the
            consumer stopped), leases that many in one `get_many`, starts their transfers and
            appends them; ends after an empty batch or an error."""
            while True:
                with cond:
                    while prefetch - len(ahead) < chunk and not stopped[0]:
                        cond.wait()
                    if stopped[0]:
                        return
                    count = prefetch - len(ahead)
                    leasing[0] = True
                items: list[Callable[[], Batch] | BaseException]
                try:
                    grants = self._lease(stage, batch_size, count, timeout_s, sampler, min_rows,
                                         columns, min_policy_version)  # fmt: skip
                    with cond:
                        leasing[0] = False
                    items = list(self._start(grants))
                except Exception as e:  # any error is handed to the consumer, which raises it
                    grants, items = [], [e]
                with cond:
                    leasing[0] = False
                    handed = not stopped[0]
                    if handed:
                        ahead.extend(items)
                        cond.notify_all()
                if not handed:  # the consumer stopped meanwhile: these never reached it
                    for item in reversed(items):
                        if not isinstance(item, BaseException):
                            self._give_back(item)
                    return
                if not grants or not grants[-1].row_ids:
                    return

        name = f"asyncflow-queue-prefetch-{stage}"
        thread = threading.Thread(target=prefetcher, name=name, daemon=True)
        thread.start()
        try:
            while True:
                with cond:
                    while not ahead:
                        cond.wait()
                    item = ahead.popleft()
                    cond.notify_all()
                if isinstance(item, BaseException):
                    raise item
                batch = item()
                if not len(batch):
                    return
                yield batch
        finally:
            with cond:
                stopped[0] = True
                left = [f for f in ahead if not isinstance(f, BaseException)]
                ahead.clear()
                cond.notify_all()
                waiting_in_controller = leasing[0]
            if not waiting_in_controller:  # it gives back what it holds (newer) and ends soon
                thread.join()
            for finish in reversed(left):  # newest first: the oldest rows end up in front
                self._give_back(finish)

    def _give_back(self, finish: Callable[[], Batch]) -> None:
        """Complete a started transfer (an owner may be blocked sending it), then nack it."""
        try:
            self.nack(finish())
        except (OSError, ValueError, RuntimeError) as e:  # closed: the dropped link returns rows
            logger.warning("could not give back prefetched rows: %s", e)

    def _start(self, grants: list[Grant]) -> list[Callable[[], Batch]]:
        """Start one transfer per owner for the rows of all `grants` together; each returned
        function waits for them and returns its grant's batch. Columns whose rows live on several
        owners are reassembled in row order. If a transfer fails every lease is given back before
        the error propagates."""
        full = [g for g in grants if g.row_ids]
        if len(full) == 1:
            locations = full[0].locations
        else:
            locations = {c: (list(itertools.chain.from_iterable(g.locations[c][0] for g in full)),
                             list(itertools.chain.from_iterable(g.locations[c][1] for g in full)))
                         for c in (full[0].locations if full else {})}  # fmt: skip
        by_owner: dict[int, list[tuple[str, list[int], list[int] | None]]] = {}
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
        leases = [g.lease_id for g in full if g.lease_id >= 0]
        started: list[tuple[list[tuple[str, list[int], list[int] | None]], Pending]] = []
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
            for lease_id in reversed(leases):  # owner unreachable: give the rows back, then fail
                self.nack_lease(lease_id)  # newest first: the oldest rows end up in front
            raise

        num_rows = sum(len(g.row_ids) for g in full)
        done: dict[str, Any] = {}
        lock = threading.Lock()

        def columns() -> dict[str, ColumnValue]:
            """The columns of all grants' rows, waited for once by whichever batch asks first."""
            with lock:
                if "error" in done:
                    raise done["error"]
                if "columns" not in done:
                    pieces: dict[str, list[tuple[list[int] | None, ColumnValue]]] = {
                        c: [] for c in locations
                    }
                    for reqs, pending in started:  # every transfer ends before any lease goes back
                        try:
                            for (col, _, positions), v in zip(reqs, pending(), strict=True):
                                pieces[col].append((positions, v))
                        except (RuntimeError, OSError) as e:
                            done.setdefault("error", e)
                    if "error" in done:
                        for lease_id in reversed(leases):
                            self.nack_lease(lease_id)
                        raise done["error"]
                    done["columns"] = self._assemble(num_rows, pieces)
                return done["columns"]

        def finisher(grant: Grant, first: int) -> Callable[[], Batch]:
            def finish() -> Batch:
                if not grant.row_ids:
                    cols: dict[str, ColumnValue] = {}
                elif len(full) == 1:
                    cols = columns()
                else:
                    end = first + len(grant.row_ids)
                    cols = {c: v.slice_rows(first, end) if isinstance(v, Ragged) else v[first:end]
                            for c, v in columns().items()}  # fmt: skip
                return Batch(grant.row_ids, cols, grant.lease_id, grant.steps, grant.group_ids,
                             grant.policy_versions, grant.num_tokens, grant.exhausted)  # fmt: skip

            return finish

        firsts = itertools.accumulate((len(g.row_ids) for g in grants[:-1]), initial=0)
        return [finisher(g, first) for g, first in zip(grants, firsts, strict=True)]

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
            self._call("ack", lease_id=batch.lease_id)

    def nack(self, batch: Batch) -> None:
        """Give the batch back: its rows are redelivered to the stage first."""
        self.nack_lease(batch.lease_id)

    def nack_lease(self, lease_id: int) -> None:
        if lease_id >= 0:
            self._call("nack", lease_id=lease_id)

    def stats(self) -> dict[str, int]:
        return self._call("stats")

    # ------------------------------------------------------------------ state, shutdown

    def taken(self, stage: str) -> dict[int, int]:
        """Rows of each step `stage` has leased or consumed (what a resumed stage has done)."""
        return {int(k): int(v) for k, v in self._call("taken", stage=stage)}

    def snapshot(self) -> dict[str, Any]:
        """The whole queue: the controller's metadata and every stored column, pulled from its
        owners. Consistent as long as no row is freed meanwhile (stored columns are write-once,
        and a checkpoint takes it while the last stage, train, is between steps). Plain data and
        tensors only (`torch.load(weights_only=True)` reads it)."""
        meta = self._call("state_dict")
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
            value = self._start([grant])[0]().columns[name]
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
        self._call("load_state_dict", state={**meta, "rows": rows, "freed": []})

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
