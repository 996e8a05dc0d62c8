"""The controller behind a TCP socket: typed, length-prefixed JSON messages, never pickle.

Frame: 4-byte big-endian length, then a UTF-8 JSON object. Request `{"op": str, "args": {...}}`;
reply `{"ok": true, "result": ..., "freed": [[slot, row_id], ...]}` or `{"ok": false, "error":
"ValueError" | "TimeoutError", "message": str}`. Every argument is checked against a per-op table of
names and JSON types before the controller sees it. One thread per connection, so a blocked `get`
parks only its own client; a closed connection expires that consumer (its leases are returned).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from asyncflow.log import get_logger
from asyncflow.queue.controller import Controller
from asyncflow.queue.metadata import Grant
from asyncflow.queue.samplers import sampler_from_dict
from asyncflow.queue.storage import mark_owner, unlink_session, unlink_stale_sessions

logger = get_logger(__name__)

_LEN = struct.Struct("!I")
_MAX_FRAME_BYTES = 64 << 20

_I, _F, _L, _D, _S = int, float, list, dict, str
_OPT = type(None)
_GET = {
    "stage": (_S,),
    "batch_size": (_I,),
    "timeout_s": (_F, _I, _OPT),
    "sampler": (_D,),
    "min_rows": (_I,),
    "columns": (_L, _OPT),
}
# op -> {arg name: allowed JSON types}
_SIGNATURES: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {},
    "reserve": {
        "num_rows": (_I,),
        "step": (_I,),
        "group_ids": (_L, _OPT),
        "timeout_s": (_F, _I, _OPT),
    },
    "commit": {
        "row_ids": (_L,),
        "columns": (_L,),
        "slots": (_L,),
        "policy_versions": (_L, _OPT),
        "num_tokens": (_L, _OPT),
        "ack_lease": (_I, _OPT),
    },  # fmt: skip
    "get": _GET,
    "get_balanced": {**_GET, "dp_rank": (_I,), "dp_size": (_I,)},
    "release": {"row_ids": (_L,)},
    "ack": {"lease_id": (_I,)},
    "nack": {"lease_id": (_I,)},
    "take_freed": {},
    "stats": {},
    "taken": {"stage": (_S,)},
    "state_dict": {},
    "load_state_dict": {"state": (_D,)},
}


def check_args(op: str, args: dict[str, Any]) -> None:
    sig = _SIGNATURES.get(op)
    if sig is None:
        raise ValueError(f"unknown op {op!r}; allowed: {list(_SIGNATURES)}")
    for name, value in args.items():
        if name not in sig:
            raise ValueError(f"op {op!r}: unknown argument {name!r}; allowed: {list(sig)}")
        if type(value) not in sig[name]:
            raise ValueError(
                f"op {op!r}: argument {name}={value!r} has type {type(value).__name__}"
            )


def dispatch(ctl: Controller, consumer: str, rank: int, op: str, args: dict[str, Any]) -> Any:
    """Run one checked request of the socket against the controller (an in-process client calls
    the controller's methods itself); the result is JSON-serialisable, except the `Grant` of the
    get ops, which the socket handler encodes."""
    check_args(op, args)
    if op == "hello":
        return {"session": ctl.session, "capacity_rows": ctl.cfg.capacity_rows}
    if op == "reserve":
        return ctl.reserve(consumer, **args)
    if op == "commit":
        return ctl.commit(consumer, rank, **args)
    if op == "release":
        return ctl.release(**args)
    if op in ("get", "get_balanced"):
        args = dict(args, sampler=sampler_from_dict(args["sampler"]))
        fn: Callable[..., Any] = ctl.get if op == "get" else ctl.get_balanced
        return fn(consumer, **args)
    if op == "ack":
        return ctl.ack(**args)
    if op == "nack":
        return ctl.nack(**args)
    if op == "take_freed":
        return []  # the freed list rides on every reply
    if op == "taken":
        return [[k, v] for k, v in ctl.taken(**args).items()]
    if op == "state_dict":
        return ctl.state_dict()
    if op == "load_state_dict":
        return ctl.load_state_dict(**args)
    return ctl.stats()


def send_frame(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_body(sock: socket.socket) -> bytes | None:
    """The next frame's bytes, or None when the peer closed the connection. An oversize length
    is a ValueError: the stream cannot be followed past it."""
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > _MAX_FRAME_BYTES:
        raise ValueError(f"control frame of {n} bytes exceeds {_MAX_FRAME_BYTES}")
    return _recv_exact(sock, n)


def decode(body: bytes) -> Any:
    """A frame's JSON; NaN and Infinity are refused (ValueError, as for malformed JSON)."""
    return json.loads(body, parse_constant=_refuse_constant)


def recv_frame(sock: socket.socket) -> Any | None:
    """The next message, or None when the peer closed the connection."""
    body = recv_body(sock)
    return None if body is None else decode(body)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"control frame holds {name}; numbers must be finite")


class ControllerServer:
    """Hosts a `Controller` on `host:port` (port 0 picks a free one; see `.address`)."""

    def __init__(self, controller: Controller, host: str, port: int = 0, secret: str = ""):
        self.controller, self._secret = controller, secret
        stale = unlink_stale_sessions()  # slabs of earlier runs whose host was killed
        if stale:
            logger.info("removed the shared-memory slabs of %d dead queue sessions", len(stale))
        mark_owner(controller.session)
        self._sock = socket.create_server((host, port))
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._conns: dict[int, socket.socket] = {}
        self._next_conn = 0
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept, name="asyncflow-queue-accept", daemon=True
        )
        self._thread.start()

    def _accept(self) -> None:
        """Accept loop: waits in `accept`, starts one handler thread per connection; ends on close."""
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # listening socket closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                cid = self._next_conn
                self._next_conn += 1
                self._conns[cid] = conn
            threading.Thread(target=self._handle, args=(cid, conn), daemon=True).start()

    def _handle(self, cid: int, conn: socket.socket) -> None:
        """Connection loop: consumes requests from one client, answers each in order; when the
        client disconnects (or dies) its consumer is expired."""
        try:
            first = recv_frame(conn)
        except (OSError, ValueError) as e:  # not a frame of ours (json's errors are ValueErrors)
            first = e
        if not isinstance(first, dict) or first.get("op") != "hello" or type(
            first.get("rank")
        ) is not int:
            logger.warning("queue connection %d refused: its first message is not a hello", cid)
            with self._lock:
                self._conns.pop(cid, None)
            conn.close()
            return
        if not hmac.compare_digest(str(first.get("secret", "")), self._secret):
            logger.warning("queue connection %d refused: wrong or missing run secret", cid)
            with contextlib.suppress(OSError):
                send_frame(conn, {"ok": False, "error": "PermissionError",
                                  "message": "wrong or missing run secret"})
            with self._lock:
                self._conns.pop(cid, None)
            conn.close()
            return
        rank = first["rank"]
        consumer = f"r{rank}c{cid}"
        try:
            send_frame(conn, {"ok": True, "result": dispatch(self.controller, consumer, rank, "hello", {}),
                              "consumer": consumer, "freed": []})  # fmt: skip
            while True:
                body = recv_body(conn)
                if body is None:
                    break
                send_frame(conn, self._answer(consumer, rank, body))
        except (OSError, ValueError) as e:  # gone, or a frame that cannot be followed
            logger.warning("queue connection %s dropped: %s", consumer, e)
        finally:
            conn.close()
            with self._lock:
                self._conns.pop(cid, None)
            if not self._closed:
                self.controller.expire_consumer(consumer)

    def _answer(self, consumer: str, rank: int, body: bytes) -> dict[str, Any]:
        """The reply to one request: its result and the rank's freed rows, or the error. An
        OSError (the controller or this connection closed) propagates to the connection loop."""
        msg: Any = None
        try:
            msg = decode(body)
            if not isinstance(msg, dict) or not isinstance(msg.get("args"), dict):
                raise ValueError("request must be {'op': str, 'args': {...}}")
            result = dispatch(self.controller, consumer, rank, str(msg.get("op")), msg["args"])
            if isinstance(result, Grant):
                result = result.to_wire()
            freed = self.controller.take_freed(rank)  # tuples: JSON arrays
            return {"ok": True, "result": result, "freed": freed}
        except (ValueError, TypeError, TimeoutError) as e:
            return {"ok": False, "error": type(e).__name__, "message": str(e)}
        except OSError:
            raise
        except Exception as e:  # a bug: answer it, keep the connection and its leases
            logger.exception("queue request %r of %s failed", msg.get("op"), consumer)
            return {"ok": False, "error": "RuntimeError",
                    "message": f"queue controller: {type(e).__name__}: {e}"}  # fmt: skip

    def close(self) -> None:
        """Stop accepting, close every connection, remove this session's slab files left on this
        host by ranks that died. Call after all clients closed."""
        self._closed = True
        self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept (Linux)
        self._sock.close()
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer
        self._thread.join(timeout=5)
        self.controller.close()
        unlink_session(self.controller.session)
