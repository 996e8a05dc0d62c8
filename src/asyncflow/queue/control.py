"""How a client reaches the controller: in process (`LocalControl`) or over the socket of
`server.py` (`RemoteControl`); both go through the same checked `dispatch`."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from typing import Any, Protocol

from asyncflow.queue.controller import Controller
from asyncflow.queue.server import dispatch, recv_frame, send_frame


class ControlPlane(Protocol):
    """How a client reaches the controller. `call` returns (result, freed (slot, row) pairs)."""

    session: str

    def call(self, op: str, args: dict[str, Any]) -> tuple[Any, list[tuple[int, int]]]: ...

    def close(self) -> None: ...


class LocalControl:
    """Controller in this process; requests go through the same checked dispatch as the socket."""

    _ids = itertools.count(1)

    def __init__(self, controller: Controller, rank: int):
        self.controller, self.rank = controller, rank
        self.consumer = f"r{rank}l{next(LocalControl._ids)}"
        self.session = controller.session

    def call(self, op: str, args: dict[str, Any]) -> tuple[Any, list[tuple[int, int]]]:
        self.controller.check_open()  # the host is shutting down: as a dropped connection
        result = dispatch(self.controller, self.consumer, self.rank, op, args)
        return result, self.controller.take_freed(self.rank)

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

    def call(self, op: str, args: dict[str, Any]) -> tuple[Any, list[tuple[int, int]]]:
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

    def close(self) -> None:
        with self._lock:
            for sock in self._all:
                with contextlib.suppress(OSError):  # wakes a thread parked in a reply's recv
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._all.clear()
            self._idle.clear()
