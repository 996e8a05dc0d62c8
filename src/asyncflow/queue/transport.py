"""Data plane: how a consumer pulls the columns it was granted from the rank that owns them.

Three implementations of `Transport.start(owner, requests)`, one call per (owner, micro-batch).
Fetches are split-phase (`start` returns a `Pending`), so a batch whose rows live on several owners
is pulled from all of them at once.
- `LocalTransport`: the owner is this process; reads its storage directly (views where possible).
- `ShmTransport`: the owner is on this host; maps its /dev/shm slabs and gathers, no message at all.
- `DistTransport`: torch.distributed point-to-point on a dedicated group. The consumer sends one
  small int64 request; the owner's serving thread answers with one uint8 payload holding every
  column (each segment 8-byte aligned), preceded by ragged lengths only when there are any.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from asyncflow.log import get_logger
from asyncflow.queue.schema import Ragged, Schema
from asyncflow.queue.storage import ColumnValue, Slabs, Storage

logger = get_logger(__name__)

Request = list[tuple[str, list[int]]]
"""Columns to fetch from one owner: (column, slots of the rows, in batch order)."""


Pending = Callable[[], list[ColumnValue]]
"""A started fetch; calling it waits for the transfer and returns the columns in request order."""


class Transport(Protocol):
    def start(self, owner: int, requests: Request) -> Pending:
        """Begin pulling `requests` from `owner`; several may be in flight at once."""
        ...

    def close(self) -> None: ...


class LocalTransport:
    """Owner == this process: read the storage unit directly."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def start(self, owner: int, requests: Request) -> Pending:
        values = [self.storage.read(col, slots) for col, slots in requests]
        return lambda: values

    def close(self) -> None:
        pass


class ShmTransport:
    """Owner on this host with `SharedMemoryStorage`: gather straight from its mapped slabs. Safe
    because a slot is reused only after every stage acked the row, and this consumer holds a lease."""

    def __init__(self, schema: Schema, session: str, num_slots: int):
        self.schema, self.session, self.num_slots = schema, session, num_slots
        self._peers: dict[int, Slabs] = {}

    def start(self, owner: int, requests: Request) -> Pending:
        slabs = self._peers.get(owner)
        if slabs is None:
            slabs = self._peers[owner] = Slabs(
                self.schema, self.session, owner, self.num_slots, create=False
            )
        values = [slabs.read(col, slots) for col, slots in requests]
        return lambda: values

    def close(self) -> None:
        self._peers.clear()


_TAG_REQ = 71
_POSTED = 16  # request receives the serving thread keeps posted
_FIRST_REPLY_TAG, _NUM_REPLY_TAGS = 1000, 1 << 20
"""Reply tags; a request's body goes on its reply tag + _NUM_REPLY_TAGS. Every rank numbers its
tags on its own, so two ranks pulling from each other use the same tags: replies (owner to
consumer) and bodies (consumer to owner) need disjoint ranges, or gloo pairs a body with a
receive posted for a reply."""
_STOP, _CONTIGUOUS, _GENERAL = -1, 0, 1
_IDLE_WAIT = timedelta(days=365)


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8


class DistTransport:
    """Pull over torch.distributed send/recv on `group` (gloo for CPU tensors). Every rank of the
    group runs a serving thread for its storage; `close()` is collective over the group.

    Request: int64[5] `[kind, column mask, first slot, count, reply tag]`; when the columns share
    one contiguous slot range (rows put together) that is all, else `kind=_GENERAL` and an int64
    body `[column, n, slots...]*` follows on its own tag. Requests are sent with `isend` into
    receives the owner keeps posted, so `start` does not wait for the owner to finish the answer
    it is sending. Reply, on the request's own tag (so fetches can overlap):
    the payload alone for fixed-shape columns, whose receive is posted before the request is sent
    (split-phase); preceded by the ragged lengths when ragged columns are requested (then `start`
    receives both before returning, so the owner's sends wait only for a consumer that is
    receiving them)."""

    def __init__(self, schema: Schema, storage: Storage, group: dist.ProcessGroup):
        self.schema, self.storage, self.group = schema, storage, group
        self.rank = dist.get_rank()
        self.ranks = dist.get_process_group_ranks(group)
        self._col_names = [c.name for c in schema.columns]
        self._row_bytes = {  # per row along dim 0 of what is sent (ragged: of the values)
            c.name: torch.empty((), dtype=c.torch_dtype).element_size()
            * (c.row_numel // c.shape[0] if c.ragged else c.row_numel)
            for c in schema.columns
        }
        self._tag_lock = threading.Lock()
        self._next_tag = 0
        self._send_buf = torch.empty(0, dtype=torch.uint8)
        self._thread = threading.Thread(
            target=self._serve, name="asyncflow-queue-serve", daemon=True
        )
        if len(self.ranks) > 1:
            self._thread.start()

    def _serve(self) -> None:
        """Serving loop: keeps `_POSTED` request receives posted (from any rank) and answers the
        requests in the order the receives were posted; `_POSTED` STOPs from a peer end it (a
        request among them is answered and its receive posted again). Gloo moves a message only
        once its receive is posted: with one receive posted per loop a request waited a round
        trip whenever the owner was busy sending the previous answer."""
        heads = [torch.empty(5, dtype=torch.int64) for _ in range(_POSTED)]
        works: list = [dist.irecv(h, group=self.group, tag=_TAG_REQ) for h in heads]
        k = 0
        while any(w is not None for w in works):
            while works[k] is None:  # a receive that got a STOP is not posted again
                k = (k + 1) % _POSTED
            # no timeout: an idle owner is not an error, and gloo closes every pair of a receive
            # that times out, which would end this rank's data plane for good
            works[k].wait(_IDLE_WAIT)
            kind, mask, first, count, reply_tag = heads[k].tolist()
            src = dist.get_global_rank(self.group, works[k]._source_rank())
            # the peer sends one STOP per posted receive: the loop ends when all got theirs
            works[k] = None if kind == _STOP else dist.irecv(heads[k], group=self.group,
                                                             tag=_TAG_REQ)
            k = (k + 1) % _POSTED
            if kind == _STOP:
                continue
            try:
                if kind == _CONTIGUOUS:
                    slots = list(range(first, first + count))
                    req = [(c, slots) for i, c in enumerate(self._col_names) if mask >> i & 1]
                else:
                    body = torch.empty(count, dtype=torch.int64)
                    dist.recv(body, src=src, group=self.group, tag=reply_tag + _NUM_REPLY_TAGS)
                    req, b, pos = [], body.tolist(), 0
                    while pos < len(b):
                        req.append((self._col_names[b[pos]], b[pos + 2 : pos + 2 + b[pos + 1]]))
                        pos += 2 + b[pos + 1]
                self._answer(src, req, reply_tag)
            except Exception:  # a bug or a dead peer: the other ranks' requests are still served
                logger.exception("queue data plane: a request of rank %d was not answered; it "
                                 "fails when its process group times out", src)  # fmt: skip

    def _answer(self, dst: int, req: Request, tag: int) -> None:
        lengths: list[int] = []
        segments: list[tuple[str, list[int], torch.Tensor | None, int]] = []
        for col, slots in req:  # ragged values are read now (their size needs the lengths)
            if self.schema.spec(col).ragged:
                value = self.storage.read(col, slots)
                assert isinstance(value, Ragged)
                lengths.extend(value.lengths.tolist())
                raw = value.values.contiguous().view(-1).view(torch.uint8)
                segments.append((col, slots, raw, raw.numel()))
            else:
                segments.append((col, slots, None, len(slots) * self._row_bytes[col]))
        if len(segments) == 1:  # one column: sent as read, a view when its rows were put together
            col, slots, raw, _ = segments[0]
            if raw is None:
                raw = self.storage.read(col, slots).contiguous().view(-1).view(torch.uint8)
            payload = raw
        else:  # one message: rows gathered straight into a send buffer reused across requests
            total = sum(_aligned(n) for *_, n in segments)
            if self._send_buf.numel() < total:
                self._send_buf = torch.empty(total, dtype=torch.uint8)
            payload, pos = self._send_buf[:total], 0
            for col, slots, raw, n in segments:
                seg = payload[pos : pos + n]
                if raw is not None:
                    seg.copy_(raw)
                else:
                    spec = self.schema.spec(col)
                    rows = seg.view(spec.torch_dtype).view(len(slots), *spec.shape)
                    self.storage.read(col, slots, out=rows)
                payload[pos + n : pos + _aligned(n)].zero_()
                pos += _aligned(n)
        if lengths:
            lens = torch.tensor(lengths, dtype=torch.int64)
            dist.send(lens, dst=dst, group=self.group, tag=tag)
        dist.send(payload, dst=dst, group=self.group, tag=tag)

    def _sizes(self, requests: Request, lens_all: torch.Tensor) -> list[tuple[int, int]]:
        """(rows along dim 0, bytes) of each requested column's segment in the payload."""
        sizes, lpos = [], 0
        for col, slots in requests:
            if self.schema.spec(col).ragged:
                num_rows = int(lens_all[lpos : lpos + len(slots)].sum())
                lpos += len(slots)
            else:
                num_rows = len(slots)
            sizes.append((num_rows, num_rows * self._row_bytes[col]))
        return sizes

    def start(self, owner: int, requests: Request) -> Pending:
        names = [c for c, _ in requests]
        slots0 = requests[0][1]
        contiguous = (
            all(s == slots0 for _, s in requests)
            and slots0 == list(range(slots0[0], slots0[0] + len(slots0)))
            and names == sorted(names, key=self.schema.index.__getitem__)  # mask implies order
        )
        num_ragged_rows = sum(len(s) for c, s in requests if self.schema.spec(c).ragged)
        with self._tag_lock:
            tag = _FIRST_REPLY_TAG + self._next_tag
            self._next_tag = (self._next_tag + 1) % _NUM_REPLY_TAGS
        lens_all = torch.empty(num_ragged_rows, dtype=torch.int64)
        if not num_ragged_rows:  # payload size known: post the receive before asking
            sizes = self._sizes(requests, lens_all)
            payload = torch.empty(sum(_aligned(n) for _, n in sizes), dtype=torch.uint8)
            work = dist.irecv(payload, src=owner, group=self.group, tag=tag)
        if contiguous:
            mask = sum(1 << self.schema.index[c] for c in names)
            msgs = [torch.tensor([_CONTIGUOUS, mask, slots0[0], len(slots0), tag])]
        else:  # the body has its own tag: a posted head receive never takes it
            body: list[int] = []
            for col, slots in requests:
                body += [self.schema.index[col], len(slots), *slots]
            msgs = [torch.tensor([_GENERAL, 0, 0, len(body), tag]), torch.tensor(body)]
        sends = [dist.isend(m, owner, self.group, _TAG_REQ if k == 0 else tag + _NUM_REPLY_TAGS)
                 for k, m in enumerate(msgs)]  # fmt: skip

        def sent() -> None:
            for w in sends:
                w.wait()

        if not num_ragged_rows:

            def wait_fixed() -> list[ColumnValue]:
                sent()
                work.wait()
                return self._decode(requests, sizes, payload, lens_all)

            return wait_fixed

        # Ragged: the payload size is known only from the lengths, so receive both now. Never
        # leave the owner's serving thread blocked on a send that no posted receive matches.
        sent()
        dist.recv(lens_all, src=owner, group=self.group, tag=tag)
        sizes = self._sizes(requests, lens_all)
        payload = torch.empty(sum(_aligned(n) for _, n in sizes), dtype=torch.uint8)
        dist.recv(payload, src=owner, group=self.group, tag=tag)
        values = self._decode(requests, sizes, payload, lens_all)
        return lambda: values

    def _decode(self, requests: Request, sizes: list[tuple[int, int]], payload: torch.Tensor,
                lens_all: torch.Tensor) -> list[ColumnValue]:  # fmt: skip
        out: list[ColumnValue] = []
        offset = lpos = 0
        for (col, slots), (num_rows, nbytes) in zip(requests, sizes, strict=True):
            spec = self.schema.spec(col)
            seg = payload[offset : offset + nbytes].view(spec.torch_dtype)
            offset += _aligned(nbytes)
            if spec.ragged:
                lens = lens_all[lpos : lpos + len(slots)]
                lpos += len(slots)
                out.append(Ragged.from_lengths(seg.view(num_rows, *spec.shape[1:]), lens))
            else:
                out.append(seg.view(len(slots), *spec.shape))
        return out

    def close(self) -> None:
        """Collective: stop every rank's serving thread (each rank stops its successor's)."""
        dist.barrier(group=self.group)
        if len(self.ranks) > 1:
            me = self.ranks.index(self.rank)
            nxt = self.ranks[(me + 1) % len(self.ranks)]
            stop = torch.tensor([_STOP, 0, 0, 0, 0], dtype=torch.int64)
            for _ in range(_POSTED):
                dist.send(stop, dst=nxt, group=self.group, tag=_TAG_REQ)
            self._thread.join(timeout=10)
