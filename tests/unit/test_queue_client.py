"""Client + storage + transports in one process: local (zero-copy) and shared memory via the
socket server, ragged columns, bad input, storage checkpoints."""

import json
import os
import socket
import struct
import threading
import time

import pytest
import torch

from asyncflow.queue import (
    ColumnSpec,
    Controller,
    QueueConfig,
    Ragged,
    StageSpec,
    connect,
    serve,
)
from asyncflow.queue.server import recv_frame, send_frame

from ..waiting import num_waiting, wait_until


def make_cfg(transport="shm", **kw):
    base = dict(
        columns=[ColumnSpec("prompt", "int64", [4]), ColumnSpec("response", "int64", [6], ragged=True),
                 ColumnSpec("logprob", "float32", [3])],
        stages=[StageSpec("rollout", ["prompt"]), StageSpec("train", ["prompt", "response", "logprob"])],
        capacity_rows=8, transport=transport, timeout_s=5.0,
    )  # fmt: skip
    base.update(kw)
    return QueueConfig(**base)


@pytest.fixture
def shm_pair():
    cfg = make_cfg()
    server = serve(cfg)
    a, b = connect(cfg, 0, address=server.address), connect(cfg, 1, address=server.address)
    yield a, b
    a.close()
    b.close()
    server.close()


def test_local_transport_is_zero_copy_for_rows_put_together():
    cfg = make_cfg("local")
    client = connect(cfg, 0, controller=Controller(cfg))
    prompt = torch.arange(12).view(3, 4)
    client.put({"prompt": prompt})
    batch = client.get("rollout", 3, timeout_s=0)
    assert batch.columns["prompt"].data_ptr() == prompt.data_ptr()
    assert torch.equal(batch.columns["prompt"], prompt)
    client.close()


def test_stream_two_stages_over_shared_memory(shm_pair):
    producer, worker = shm_pair
    prompt = torch.arange(20).view(5, 4)
    ids = producer.put({"prompt": prompt}, step=3)
    got = worker.get("rollout", 8, timeout_s=1)
    assert got.row_ids == ids and got.steps == [3] * 5
    assert torch.equal(got.columns["prompt"], prompt)
    responses = [torch.arange(n) for n in (1, 6, 3, 2, 4)]
    worker.put(
        {"response": responses, "logprob": torch.rand(5, 3)},
        rows=got.row_ids,
        policy_versions=[7] * 5,
    )
    worker.ack(got)
    train = producer.get("train", 8, timeout_s=1)
    assert train.policy_versions == [7] * 5
    resp = train.columns["response"]
    assert isinstance(resp, Ragged) and [r.tolist() for r in resp.rows()] == [
        r.tolist() for r in responses
    ]
    assert resp.padded(-1).shape == (5, 6) and resp.padded(-1)[0, 1] == -1
    assert torch.equal(train.columns["prompt"], prompt)  # prompt from rank 0, response from rank 1
    producer.ack(train)
    assert producer.stats()["num_rows"] == 0


def test_freed_slots_are_reused(shm_pair):
    producer, consumer = shm_pair
    cfg_stages = ["rollout", "train"]
    for round_ in range(5):  # 5 x 4 rows through a capacity of 8
        ids = producer.put({"prompt": torch.full((4, 4), round_), "response": [torch.ones(2, dtype=torch.int64)] * 4,
                            "logprob": torch.zeros(4, 3)}, timeout_s=1)  # fmt: skip
        for stage in cfg_stages:
            b = consumer.get(stage, 4, timeout_s=1)
            assert b.row_ids == ids and bool((b.columns["prompt"] == round_).all())
            consumer.ack(b)
    assert producer.stats()["num_rows"] == 0


def test_in_process_client_reuses_slots_freed_on_its_answers():
    """The host rank's client calls its controller's methods directly; the freed rows still ride
    on every answer, so its storage reuses their slots (5 x 4 rows through a capacity of 8)."""
    cfg = make_cfg(stages=[StageSpec("rollout", ["prompt"])])
    server = serve(cfg)
    host = connect(cfg, 0, controller=server.controller)
    for round_ in range(5):
        ids = host.put({"prompt": torch.full((4, 4), round_)}, timeout_s=1)
        batch = host.get("rollout", 4, timeout_s=1)
        assert batch.row_ids == ids and bool((batch.columns["prompt"] == round_).all())
        host.ack(batch)
    assert host.stats()["num_rows"] == 0
    assert host.storage.num_free_slots == cfg.capacity_rows
    host.close()
    server.close()


def test_killed_connection_returns_leases():
    cfg = make_cfg()
    server = serve(cfg)
    producer = connect(cfg, 0, address=server.address)
    doomed = connect(cfg, 1, address=server.address)
    ids = producer.put({"prompt": torch.zeros(3, 4, dtype=torch.int64)})
    assert doomed.get("rollout", 3, timeout_s=1).row_ids == ids
    doomed.control.close()  # the consumer vanishes without acking
    again = producer.get("rollout", 3, timeout_s=2)
    assert again.row_ids == ids
    producer.close()
    doomed.storage.close()
    server.close()


@pytest.mark.parametrize("transport", ["local", "shm"])
def test_ragged_rows_round_trip_whole_or_as_a_list(transport):
    """A Ragged put is checked and stored as a whole (shared memory: one padded indexed copy) and
    comes back row for row, also for empty rows, rows put apart and a get in another order."""
    cfg = make_cfg(transport, capacity_rows=16)
    server = serve(cfg)
    client = connect(cfg, 0, address=server.address)
    rows = [torch.arange(n, dtype=torch.int64) + 10 * n for n in (3, 0, 6, 1)]
    a = client.put({"prompt": torch.zeros(4, 4, dtype=torch.int64),
                    "response": Ragged(torch.cat(rows), torch.tensor([0, 3, 3, 9, 10]))})
    b = client.put({"prompt": torch.ones(2, 4, dtype=torch.int64), "response": rows[2:0:-1]})
    client.put({"logprob": torch.zeros(6, 3)}, rows=[*a, *b])
    batch = client.get("train", 6, timeout_s=1)
    got = dict(zip(batch.row_ids, batch.columns["response"].rows(), strict=True))
    want = dict(zip([*a, *b], [*rows, rows[2], rows[1]], strict=True))
    assert sorted(got) == sorted(want)
    for r, v in want.items():
        assert torch.equal(got[r], v), r
    client.close()
    server.close()


def test_closing_the_host_wakes_its_in_process_waiters():
    """The host rank's stages call the controller in-process: when it aborts, a stage parked in
    `get` or in a full `put` must fail at once (as a remote one does when its socket drops), not
    sleep until its timeout."""
    import threading

    cfg = make_cfg(capacity_rows=1, timeout_s=30.0)
    server = serve(cfg)
    host = connect(cfg, 0, controller=server.controller)
    host.put({"prompt": torch.zeros(1, 4, dtype=torch.int64)})
    host.ack(host.get("rollout", 1, timeout_s=1))  # row now waits for train only: queue full
    errors: dict[str, BaseException] = {}

    def park(name, fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors[name] = e

    parked = [threading.Thread(target=park, args=("get", lambda: host.get("rollout", 1))),
              threading.Thread(target=park, args=("put", lambda: host.put(
                  {"prompt": torch.zeros(1, 4, dtype=torch.int64)})))]
    for t in parked:
        t.start()
    ctl = server.controller
    wait_until(lambda: num_waiting(ctl._stages["rollout"].cond) == 1
               and num_waiting(ctl._space) == 1, what="get and put parked in the controller")
    t0 = time.monotonic()
    server.close()
    for t in parked:
        t.join(timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert sorted(errors) == ["get", "put"]
    assert all(isinstance(e, ConnectionError) for e in errors.values()), errors
    with pytest.raises(ConnectionError, match="closed"):
        host.stats()
    host.abort()


@pytest.mark.parametrize(
    "columns, match",
    [
        ({"nope": torch.zeros(2, 4)}, "unknown column"),
        ({"prompt": torch.zeros(2, 5, dtype=torch.int64)}, "contradicts schema"),
        ({"prompt": torch.zeros(2, 4, dtype=torch.int32)}, "dtype"),
        ({"response": [torch.zeros(7, dtype=torch.int64)]}, "contradicts schema"),
        ({"response": torch.zeros(2, 6, dtype=torch.int64)}, "ragged"),
        ({"prompt": torch.zeros(2, 4, dtype=torch.int64), "logprob": torch.zeros(3, 3)}, "rows"),
        ({"response": Ragged(torch.zeros(9, dtype=torch.int64), torch.tensor([0, 2, 9]))},
         "length 7 contradicts"),
        ({"response": Ragged(torch.zeros(4, dtype=torch.int32), torch.tensor([0, 1, 4]))},
         "dtype"),
        ({"response": Ragged(torch.zeros(4, dtype=torch.int64), torch.tensor([0, 3, 2, 4]))},
         "do not cover"),
        ({"response": Ragged(torch.zeros(4, dtype=torch.int64), torch.tensor([0, 1, 3]))},
         "do not cover"),
    ],
)
def test_bad_put_refused_and_queue_unchanged(shm_pair, columns, match):
    producer, _ = shm_pair
    producer.put({"prompt": torch.zeros(1, 4, dtype=torch.int64)})
    before, free_before = producer.stats(), producer.storage.num_free_slots
    with pytest.raises(ValueError, match=match):
        producer.put(columns)
    assert producer.stats() == before and producer.storage.num_free_slots == free_before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rows": [0, 0]}, "duplicates"),
        # refused by the controller after rows were reserved and written: both undone
        ({"num_tokens": [5, "x"]}, "num_tokens must hold integers"),
        ({"policy_versions": [1, None]}, "policy_versions must hold integers"),
    ],
)
def test_bad_put_arguments_refused_and_queue_unchanged(shm_pair, kwargs, match):
    producer, _ = shm_pair
    producer.put({"prompt": torch.zeros(1, 4, dtype=torch.int64)})
    before, free_before = producer.stats(), producer.storage.num_free_slots
    with pytest.raises(ValueError, match=match):
        producer.put({"prompt": torch.ones(2, 4, dtype=torch.int64)}, **kwargs)
    assert producer.stats() == before and producer.storage.num_free_slots == free_before


def test_put_to_freed_row_refused_and_storage_rolled_back():
    cfg = make_cfg(stages=[StageSpec("rollout", ["prompt"])])
    server = serve(cfg)
    client = connect(cfg, 0, address=server.address)
    ids = client.put({"prompt": torch.zeros(2, 4, dtype=torch.int64)})
    client.ack(client.get("rollout", 2, timeout_s=1))
    client.stats()  # the freed list rides on this reply
    free_before = client.storage.num_free_slots
    with pytest.raises(ValueError, match="already freed"):
        client.put({"logprob": torch.zeros(2, 3)}, rows=ids)
    assert client.storage.num_free_slots == free_before == cfg.capacity_rows
    with pytest.raises(ValueError, match="batch_size=0"):
        client.get("rollout", 0)
    with pytest.raises(ValueError, match="unknown stage"):
        client.get("nobody", 4)
    client.close()
    server.close()


def test_put_blocks_when_full_and_times_out():
    cfg = make_cfg(capacity_rows=2)
    server = serve(cfg)
    client = connect(cfg, 0, address=server.address)
    client.put({"prompt": torch.zeros(2, 4, dtype=torch.int64)})
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="queue full"):
        client.put({"prompt": torch.zeros(1, 4, dtype=torch.int64)}, timeout_s=0.1)
    assert 0.1 <= time.monotonic() - t0 < 1.0
    client.close()
    server.close()


@pytest.mark.parametrize("transport", ["local", "shm"])
def test_snapshot_restores_rows_columns_and_leases_into_a_new_queue(tmp_path, transport):
    cfg = make_cfg(transport=transport)
    server = serve(cfg)
    client = connect(cfg, 0, address=server.address)
    prompt = torch.arange(12).view(3, 4)
    rows = client.put({"prompt": prompt})
    client.put({"response": [torch.arange(3), torch.arange(5)], "logprob": torch.ones(2, 3)},
               rows=rows[:2])
    leased = client.get("rollout", 1, timeout_s=0)  # a lease is redelivered after the restore
    torch.save(client.snapshot(), tmp_path / "q.pt")
    client.close()
    server.close()

    server2 = serve(cfg)
    client2 = connect(cfg, 1, address=server2.address)
    client2.restore(torch.load(tmp_path / "q.pt", weights_only=True))
    batch = client2.get("train", 4, timeout_s=0)
    assert batch.row_ids == rows[:2]
    assert torch.equal(batch.columns["prompt"], prompt[:2])
    assert batch.columns["response"].lengths.tolist() == [3, 5]
    again = client2.get("rollout", 4, timeout_s=0)
    assert sorted(again.row_ids) == sorted(rows) and leased.row_ids[0] in again.row_ids
    assert client2.put({"prompt": prompt[:1]}) == [rows[-1] + 1]  # row ids continue
    client2.close()
    server2.close()


def test_control_socket_refuses_untyped_requests():
    cfg = make_cfg()
    server = serve(cfg)
    assert server.address[0] == "127.0.0.1"
    sock = socket.create_connection(server.address)
    send_frame(sock, {"op": "hello", "rank": 0})
    assert recv_frame(sock)["ok"]
    send_frame(sock, {"op": "get", "args": {"stage": "rollout", "batch_size": "4"}})
    reply = recv_frame(sock)
    assert not reply["ok"] and "batch_size" in reply["message"]
    send_frame(sock, {"op": "__import__", "args": {}})
    assert "unknown op" in recv_frame(sock)["message"]
    sock.close()
    server.close()


def test_control_socket_survives_hostile_frames_and_internal_errors(monkeypatch):
    cfg = make_cfg()
    server = serve(cfg)
    sock = socket.create_connection(server.address, timeout=5)
    send_frame(sock, [1, 2])  # a first message that is not a hello: that connection is closed
    assert recv_frame(sock) is None
    sock.close()
    client = connect(cfg, 0, address=server.address)
    client.put({"prompt": torch.zeros(2, 4, dtype=torch.int64)})
    batch = client.get("rollout", 2, timeout_s=1)
    sock = socket.create_connection(server.address, timeout=5)
    send_frame(sock, {"op": "hello", "rank": 0})
    assert recv_frame(sock)["ok"]
    body = b'{"op": "get", "args": {"stage": "rollout", "batch_size": 1, "timeout_s": NaN}}'
    sock.sendall(struct.pack("!I", len(body)) + body)  # json.dumps would never write NaN
    reply = recv_frame(sock)
    assert not reply["ok"] and "NaN" in reply["message"]
    send_frame(sock, {"op": "stats", "args": {}})  # the connection is still served
    assert recv_frame(sock)["ok"]
    sock.close()

    def broken():
        raise KeyError("a controller bug")

    monkeypatch.setattr(server.controller, "stats", broken)
    with pytest.raises(RuntimeError, match="a controller bug"):
        client.stats()
    client.ack(batch)  # the connection stayed up, so its lease is still held
    client.close()
    server.close()


def test_closing_a_client_wakes_its_thread_waiting_in_get():
    cfg = make_cfg()
    server = serve(cfg)
    client = connect(cfg, 0, address=server.address)
    errors = []

    def wait():
        try:
            client.get("rollout", 1, timeout_s=30)
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    wait_until(lambda: num_waiting(server.controller._stages["rollout"].cond) == 1,
               what="the get parked in the controller")
    client.close()
    t.join(5)
    assert not t.is_alive() and errors
    server.close()


def test_startup_under_one_second():
    cfg = make_cfg()
    t0 = time.monotonic()
    server = serve(cfg)
    client = connect(cfg, 0, address=server.address)
    client.put({"prompt": torch.zeros(1, 4, dtype=torch.int64)})
    elapsed = time.monotonic() - t0
    session = client.control.session
    client.close()
    server.close()
    assert elapsed < 1.0
    assert not [f for f in os.listdir("/dev/shm") if session in f], "slab files left behind"


def test_shm_owner_not_on_this_host_is_an_error_and_rows_go_back(shm_pair):
    producer, consumer = shm_pair
    producer.put({"prompt": torch.zeros(2, 4, dtype=torch.int64)})
    producer.storage.close()  # the slab files vanish, as if rank 0 lived on another host
    with pytest.raises(ValueError, match="transport='dist' across hosts"):
        consumer.get("rollout", 2, timeout_s=1)
    assert consumer.stats()["ready/rollout"] == 2  # the lease was given back


def test_memory_storage_makes_no_garbage_collected_object_per_row():
    """Every put used to leave one tuple per row and column: container objects that make the
    cyclic collector run (and rescan everything alive) far more often than the writes cost."""
    import gc

    from asyncflow.queue.schema import Schema
    from asyncflow.queue.storage import MemoryStorage

    cfg = make_cfg("local")
    storage = MemoryStorage(Schema(cfg.columns))
    puts = [{"prompt": torch.zeros(64, 4, dtype=torch.int64),
             "response": Ragged(torch.zeros(64 * 3, dtype=torch.int64),
                                torch.arange(0, 64 * 3 + 1, 3))} for _ in range(16)]
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        for i, cols in enumerate(puts):
            storage.write(list(range(64 * i, 64 * (i + 1))), cols)
        grown = len(gc.get_objects()) - before
    finally:
        gc.enable()
    assert grown < 64, f"{grown} tracked objects for 1024 rows x 2 columns"
    assert torch.equal(storage.read("response", [5, 700]).values, torch.zeros(6, dtype=torch.int64))


def test_memory_storage_reads_ragged_rows_of_one_put_without_copying():
    from asyncflow.queue.schema import Schema
    from asyncflow.queue.storage import MemoryStorage

    storage = MemoryStorage(Schema(make_cfg("local").columns))
    rows = [torch.arange(n, dtype=torch.int64) + 10 * n for n in (3, 0, 6, 1)]
    values = torch.cat(rows)
    storage.write([0, 1, 2, 3], {"response": Ragged(values, torch.tensor([0, 3, 3, 9, 10]))})
    storage.write([4], {"response": Ragged(torch.tensor([7, 7]), torch.tensor([0, 2]))})
    for slots in ([1, 2, 3], [0, 1, 2, 3], [3, 2], [2, 4], [1]):  # in order, reversed, two puts
        got = storage.read("response", slots)
        want = [rows[s] if s < 4 else torch.tensor([7, 7]) for s in slots]
        assert [r.tolist() for r in got.rows()] == [w.tolist() for w in want], slots
    # rows of one put, in order: a view of the put's values
    assert storage.read("response", [1, 2, 3]).values.data_ptr() == values[3:].data_ptr()


def test_grants_cross_the_socket_packed_and_come_back_equal():
    from asyncflow.queue.metadata import Grant, pack_ints, unpack_ints

    for xs in ([], [4], [4, 9], [3, 4, 5, 6], [7, 7, 7], [9, 7, 5, 3], [1, 2, 4], [2, 2, 3]):
        packed = pack_ints(xs)
        assert unpack_ints(packed) == xs
        assert isinstance(packed, dict) == (len(xs) >= 3 and xs in ([3, 4, 5, 6], [7, 7, 7],
                                                                   [9, 7, 5, 3]))
    rows = list(range(100, 164))
    grant = Grant(3, rows, [2] * 64, [-1 - r for r in rows], [5] * 63 + [6], [9, 1] * 32,
                  {"a": ([0] * 64, rows), "b": ([0] * 64, list(rows)), "c": ([1] * 64, rows[::-1])})
    wire = grant.to_wire()
    assert wire["locations"]["b"] == "a"  # columns stored together are sent once
    assert all(isinstance(wire[k], dict) for k in ("rows", "steps", "groups"))
    assert isinstance(wire["tokens"], list)  # no progression: sent as it is
    assert len(json.dumps(wire)) < 1000  # ~3 KB as plain lists
    assert Grant.from_wire(json.loads(json.dumps(wire))) == grant


def test_memory_storage_reads_dense_rows_of_several_puts_in_any_order():
    from asyncflow.queue.schema import Schema
    from asyncflow.queue.storage import MemoryStorage

    storage = MemoryStorage(Schema(make_cfg("local").columns))
    a, b = torch.arange(12).view(3, 4), torch.arange(100, 108).view(2, 4)
    storage.write([0, 1, 2], {"prompt": a})
    storage.write([3, 4], {"prompt": b})
    rows = torch.cat([a, b])
    for slots in ([0, 1, 2, 3, 4], [1, 2, 3], [4, 3, 2], [0, 3, 1, 4], [2]):
        assert torch.equal(storage.read("prompt", slots), rows[slots]), slots
        out = torch.full((len(slots), 4), -1)  # what a data plane gathers into its message
        assert storage.read("prompt", slots, out=out) is out and torch.equal(out, rows[slots])
    assert storage.read("prompt", [1, 2]).data_ptr() == a[1].data_ptr()  # one put: a view


def test_shared_memory_storage_reads_rows_into_a_given_tensor():
    from asyncflow.queue.schema import Schema
    from asyncflow.queue.storage import SharedMemoryStorage

    storage = SharedMemoryStorage(Schema(make_cfg().columns), "t-out", 0, num_slots=4)
    try:
        rows = torch.arange(12).view(3, 4)
        slots = storage.write([7, 8, 9], {"prompt": rows})
        for order in ([0, 1, 2], [2, 0]):
            out = torch.full((len(order), 4), -1)
            got = storage.read("prompt", [slots[i] for i in order], out=out)
            assert got is out and torch.equal(out, rows[order])
    finally:
        storage.close()
