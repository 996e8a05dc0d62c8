"""Shared-memory slabs of a queue whose host was SIGKILLed are removed by the next run's host."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

from asyncflow.queue import Controller, QueueConfig
from asyncflow.queue.server import ControllerServer
from asyncflow.queue.storage import mark_owner, unlink_stale_sessions


def _session_files(pid: int) -> tuple[str, list[Path]]:
    session = "test" + uuid.uuid4().hex[:8]
    files = [Path(f"/dev/shm/asyncflow-{session}-r0-{c}") for c in ("reward", "uid", "uid.len")]
    for f in files:
        f.write_bytes(b"\0" * 64)
    Path(f"/dev/shm/asyncflow-{session}-owner").write_text(str(pid))
    return session, files


def test_slabs_of_a_dead_host_go_and_those_of_a_live_one_stay():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    gone, gone_files = _session_files(dead.pid)
    alive, alive_files = _session_files(os.getpid())
    try:
        assert gone in unlink_stale_sessions()
        assert not any(f.exists() for f in gone_files)
        assert not Path(f"/dev/shm/asyncflow-{gone}-owner").exists()
        assert all(f.exists() for f in alive_files)
    finally:
        for f in [*alive_files, Path(f"/dev/shm/asyncflow-{alive}-owner")]:
            f.unlink(missing_ok=True)


def test_a_queue_host_marks_its_session_and_removes_the_mark_on_close():
    controller = Controller(QueueConfig(columns=[], stages=[], capacity_rows=8, timeout_s=1.0))
    server = ControllerServer(controller, "127.0.0.1")
    marker = Path(f"/dev/shm/asyncflow-{controller.session}-owner")
    assert marker.read_text() == str(os.getpid())
    server.close()
    assert not marker.exists()
    mark_owner("unused")  # no error without a session's slabs either
    Path("/dev/shm/asyncflow-unused-owner").unlink()


def test_a_rank_closing_while_the_host_removes_its_slabs_does_not_fail(monkeypatch):
    """The host unlinks every slab of the session when it closes, possibly while a rank closes
    its own storage: the rank must not fail on a file that went between a check and its unlink
    (the race is pinned by making every existence check say yes)."""
    import torch

    from asyncflow.queue import ColumnSpec, Ragged
    from asyncflow.queue.schema import Schema
    from asyncflow.queue.storage import SharedMemoryStorage, unlink_session

    session = "test" + uuid.uuid4().hex[:8]
    schema = Schema([ColumnSpec("ids", "int64", [4], ragged=True)])
    storage = SharedMemoryStorage(schema, session, 1, num_slots=8)
    storage.write([0, 1], {"ids": Ragged.from_lists([[1, 2], [3]], torch.long)})
    paths = storage.slabs.paths()
    assert paths and all(os.path.exists(p) for p in paths)
    unlink_session(session)  # the host got there first
    monkeypatch.setattr(os.path, "exists", lambda _: True)
    storage.close()
    monkeypatch.undo()
    assert not any(os.path.exists(p) for p in paths)
