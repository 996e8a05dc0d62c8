"""Run a function on N forked ranks with a gloo process group and a short timeout."""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

PG_TIMEOUT = timedelta(seconds=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forget_inherited_forkserver() -> None:
    """torchrun starts each rank as a fresh process. A rank forked from a pytest process in which
    an earlier test started multiprocessing's forkserver (a reward worker) inherits a handle on a
    server that is not its child, and its own reward workers then fail to start. Drop this copy
    of the handle (the parent's server keeps running) so the rank starts its own server."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if server._forkserver_pid is not None:
        os.close(server._forkserver_alive_fd)  # this process's copy of the fd only
        server._forkserver_address = server._forkserver_alive_fd = None
        server._forkserver_pid = None


def _entry(fn, rank, world_size, port, results, timeout_s, kwargs):
    # a hung rank prints every thread's stack before the parent gives up on it
    faulthandler.dump_traceback_later(max(timeout_s - 5, 1), exit=True)
    _forget_inherited_forkserver()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=PG_TIMEOUT)
        out = fn(rank, world_size, **kwargs)
        results.put((rank, "ok", out))
        dist.destroy_process_group()
    except BaseException:  # report any failure of the rank to the parent, then exit non-zero
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()  # flush before the hard exit below
        os._exit(1)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    timeout_s: float = 30.0,
    may_die: tuple[int, ...] = (),
    **kwargs: Any,
) -> dict[int, Any]:
    """Fork `world_size` ranks running `fn(rank, world_size, **kwargs)`; return {rank: result}.
    Ranks in `may_die` may exit without a result (a killed consumer)."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, results, timeout_s, kwargs))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    needed = set(range(world_size)) - set(may_die)
    try:
        while not needed <= set(out):
            try:
                rank, status, value = results.get(timeout=timeout_s)
            except queue.Empty:
                codes = {r: p.exitcode for r, p in enumerate(procs)}
                errors.append(
                    f"no result within {timeout_s}s from ranks {needed - set(out)}; exit codes {codes}"
                )
                break
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return out
