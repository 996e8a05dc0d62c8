"""How a client reaches the controller: in process (`LocalControl`: the controller's methods,
called directly) or over the socket of `server.py` (`RemoteControl`: typed JSON requests that the
server checks and dispatches by name). Both stand in for one client: they pass its consumer name
and rank, and answer every call with (result, freed), `freed` being the (slot, row id) of this
rank's rows freed since the last answer, which the client's storage reuses."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from typing import Any, Protocol, TypeVar

from asyncflow.queue.controller import Controller
from asyncflow.queue.metadata import Grant
from asyncflow.queue.samplers import Sampler
from asyncflow.queue.server import recv_frame, send_frame

Freed = list[tuple[int, int]]
"""(slot, row id) of this rank's rows freed since the last answer."""

T = TypeVar("T")


class ControlPlane(Protocol):
    """The controller's operations as one client makes them (see `Controller` for each)."""

    session: str

    def reserve(self, num_rows: int, step: int, group_ids: list[int] | None,
                timeout_s: float) -> tuple[list[int], Freed]: ...  # fmt: skip

    def commit(self, row_ids: list[int], columns: list[str], slots: list[int],
               policy_versions: list[int] | None, num_tokens: list[int] | None,
               ack_lease: int | None) -> tuple[None, Freed]: ...  # fmt: skip

    def release(self, row_ids: list[int]) -> tuple[None, Freed]: ...

    def take_freed(self) -> tuple[None, Freed]:
        """Only the freed rows: the storage is full and waits for slots."""
        ...

    def get(self, stage: str, batch_size: int, timeout_s: float | None, sampler: Sampler,
            min_rows: int, columns: list[str] | None) -> tuple[Grant, Freed]: ...  # fmt: skip

    def get_balanced(self, stage: str, dp_rank: int, dp_size: int, batch_size: int,
                     timeout_s: float | None, sampler: Sampler, min_rows: int,
                     columns: list[str] | None) -> tuple[Grant, Freed]: ...  # fmt: skip

    def ack(self, lease_id: int) -> tuple[None, Freed]: ...

    def nack(self, lease_id: int) -> tuple[None, Freed]: ...

    def stats(self) -> tuple[dict[str, int], Freed]: ...

    def taken(self, stage: str) -> tuple[dict[int, int], Freed]: ...

    def state_dict(self) -> tuple[dict[str, Any], Freed]: ...

    def load_state_dict(self, state: dict[str, Any]) -> tuple[None, Freed]: ...

    def close(self) -> None: ...


class LocalControl:
    """Controller in this process: each call is the controller's method, with this client's
    consumer and rank; arguments are not encoded, nor checked against the socket's table."""

    _ids = itertools.count(1)

    def __init__(self, controller: Controller, rank: int):
        self.controller, self.rank = controller, rank
        self.consumer = f"r{rank}l{next(LocalControl._ids)}"
        self.session = controller.session

    def _open(self) -> Controller:
        self.controller.check_open()  # the host is shutting down: as a dropped connection
        return self.controller

    def _reply(self, result: T) -> tuple[T, Freed]:
        """The freed list rides on every answer, as on every reply over the socket."""
        return result, self.controller.take_freed(self.rank)

    def reserve(self, num_rows: int, step: int, group_ids: list[int] | None,
                timeout_s: float) -> tuple[list[int], Freed]:  # fmt: skip
        return self._reply(self._open().reserve(self.consumer, num_rows, step, group_ids,
                                                timeout_s))  # fmt: skip

    def commit(self, row_ids: list[int], columns: list[str], slots: list[int],
               policy_versions: list[int] | None, num_tokens: list[int] | None,
               ack_lease: int | None) -> tuple[None, Freed]:  # fmt: skip
        return self._reply(self._open().commit(self.consumer, self.rank, row_ids, columns, slots,
                                               policy_versions, num_tokens, ack_lease))  # fmt: skip

    def release(self, row_ids: list[int]) -> tuple[None, Freed]:
        return self._reply(self._open().release(row_ids))

    def take_freed(self) -> tuple[None, Freed]:
        self._open()
        return self._reply(None)

    def get(self, stage: str, batch_size: int, timeout_s: float | None, sampler: Sampler,
            min_rows: int, columns: list[str] | None) -> tuple[Grant, Freed]:  # fmt: skip
        return self._reply(self._open().get(self.consumer, stage, batch_size, timeout_s, sampler,
                                            min_rows, columns))  # fmt: skip

    def get_balanced(self, stage: str, dp_rank: int, dp_size: int, batch_size: int,
                     timeout_s: float | None, sampler: Sampler, min_rows: int,
                     columns: list[str] | None) -> tuple[Grant, Freed]:  # fmt: skip
        return self._reply(self._open().get_balanced(self.consumer, stage, dp_rank, dp_size,
                                                     batch_size, timeout_s, sampler, min_rows,
                                                     columns))  # fmt: skip

    def ack(self, lease_id: int) -> tuple[None, Freed]:
        return self._reply(self._open().ack(lease_id))

    def nack(self, lease_id: int) -> tuple[None, Freed]:
        return self._reply(self._open().nack(lease_id))

    def stats(self) -> tuple[dict[str, int], Freed]:
        return self._reply(self._open().stats())

    def taken(self, stage: str) -> tuple[dict[int, int], Freed]:
        return self._reply(self._open().taken(stage))

    def state_dict(self) -> tuple[dict[str, Any], Freed]:
        return self._reply(self._open().state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> tuple[None, Freed]:
        return self._reply(self._open().load_state_dict(state))

    def close(self) -> None:
        self.controller.expire_consumer(self.consumer)


class RemoteControl:
    """Controller behind `ControllerServer`. One TCP connection per concurrent caller (a pool), so
    a stage thread parked in `get` never blocks another thread's `put` on the same rank."""

    def __init__(self, address: tuple[str, int], rank: int, timeout_s: float, secret: str = ""):
        self.address, self.rank, self.timeout_s, self.secret = address, rank, timeout_s, secret
        self._idle: list[socket.socket] = []
        self._all: list[socket.socket] = []
        self._lock = threading.Lock()
        sock = self._open()
        self._idle.append(sock)

    def _open(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self.timeout_s)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_frame(sock, {"op": "hello", "rank": self.rank, "secret": self.secret})
        reply = recv_frame(sock)
        if reply is None:
            raise ConnectionError(
                f"queue controller at {self.address} closed the connection during hello"
            )
        if not reply.get("ok"):
            raise ConnectionError(f"queue controller at {self.address} refused this client: "
                                  f"{reply.get('message')}")
        self.session = reply["result"]["session"]
        with self._lock:
            self._all.append(sock)
        return sock

    def call(self, op: str, args: dict[str, Any]) -> tuple[Any, Freed]:
        """One request by name (`server.dispatch`); the JSON result and the freed rows."""
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        if sock is None:
            sock = self._open()
        try:
            send_frame(sock, {"op": op, "args": args})
            reply = recv_frame(sock)
        except (ConnectionResetError, BrokenPipeError):  # its host died mid-call
            reply = None
        if reply is None:
            raise ConnectionError("queue controller closed the connection")
        with self._lock:
            self._idle.append(sock)
        if not reply["ok"]:
            exc = {"ValueError": ValueError, "TimeoutError": TimeoutError,
                   "TypeError": TypeError}.get(reply["error"], RuntimeError)  # fmt: skip
            raise exc(reply["message"])
        return reply["result"], [(int(s), int(r)) for s, r in reply["freed"]]

    def reserve(self, num_rows: int, step: int, group_ids: list[int] | None,
                timeout_s: float) -> tuple[list[int], Freed]:  # fmt: skip
        return self.call("reserve", {"num_rows": num_rows, "step": step, "group_ids": group_ids,
                                     "timeout_s": timeout_s})  # fmt: skip

    def commit(self, row_ids: list[int], columns: list[str], slots: list[int],
               policy_versions: list[int] | None, num_tokens: list[int] | None,
               ack_lease: int | None) -> tuple[None, Freed]:  # fmt: skip
        return self.call("commit", {"row_ids": row_ids, "columns": columns, "slots": slots,
                                    "policy_versions": policy_versions, "num_tokens": num_tokens,
                                    "ack_lease": ack_lease})  # fmt: skip

    def release(self, row_ids: list[int]) -> tuple[None, Freed]:
        return self.call("release", {"row_ids": row_ids})

    def take_freed(self) -> tuple[None, Freed]:
        _, freed = self.call("take_freed", {})
        return None, freed

    def get(self, stage: str, batch_size: int, timeout_s: float | None, sampler: Sampler,
            min_rows: int, columns: list[str] | None) -> tuple[Grant, Freed]:  # fmt: skip
        wire, freed = self.call("get", {
            "stage": stage, "batch_size": batch_size, "timeout_s": timeout_s,
            "sampler": sampler.to_dict(), "min_rows": min_rows, "columns": columns,
        })  # fmt: skip
        return Grant.from_wire(wire), freed

    def get_balanced(self, stage: str, dp_rank: int, dp_size: int, batch_size: int,
                     timeout_s: float | None, sampler: Sampler, min_rows: int,
                     columns: list[str] | None) -> tuple[Grant, Freed]:  # fmt: skip
        wire, freed = self.call("get_balanced", {
            "stage": stage, "dp_rank": dp_rank, "dp_size": dp_size, "batch_size": batch_size,
            "timeout_s": timeout_s, "sampler": sampler.to_dict(), "min_rows": min_rows,
            "columns": columns,
        })  # fmt: skip
        return Grant.from_wire(wire), freed

    def ack(self, lease_id: int) -> tuple[None, Freed]:
        return self.call("ack", {"lease_id": lease_id})

    def nack(self, lease_id: int) -> tuple[None, Freed]:
        return self.call("nack", {"lease_id": lease_id})

    def stats(self) -> tuple[dict[str, int], Freed]:
        return self.call("stats", {})

    def taken(self, stage: str) -> tuple[dict[int, int], Freed]:
        pairs, freed = self.call("taken", {"stage": stage})
        return {int(k): int(v) for k, v in pairs}, freed

    def state_dict(self) -> tuple[dict[str, Any], Freed]:
        return self.call("state_dict", {})

    def load_state_dict(self, state: dict[str, Any]) -> tuple[None, Freed]:
        return self.call("load_state_dict", {"state": state})

    def close(self) -> None:
        with self._lock:
            for sock in self._all:
                with contextlib.suppress(OSError):  # wakes a thread parked in a reply's recv
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._all.clear()
            self._idle.clear()
