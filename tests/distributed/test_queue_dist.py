"""Multi-process queue tests: forked ranks (gloo, short timeouts), the controller hosted by the
test process behind its socket, columns moved over shared memory or gloo point-to-point."""

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

from asyncflow.queue import (
    ColumnSpec,
    GroupSampler,
    QueueConfig,
    StageSpec,
    StepSampler,
    connect,
    serve,
)
from asyncflow.queue.schema import Schema
from asyncflow.queue.storage import MemoryStorage
from asyncflow.queue.transport import _POSTED, _STOP, _TAG_REQ, DistTransport

from ._mp import PG_TIMEOUT, run_ranks

ROWS_PER_PRODUCER = 48


def pipeline_cfg(transport, num_rows, **kw):
    base = dict(
        columns=[ColumnSpec("prompt", "int64", [8]), ColumnSpec("response", "int64", [16], ragged=True),
                 ColumnSpec("reward", "float32", [])],
        stages=[StageSpec("rollout", ["prompt"]), StageSpec("reward", ["prompt", "response"]),
                StageSpec("train", ["prompt", "response", "reward"])],
        capacity_rows=32, rows_per_step=num_rows, transport=transport, timeout_s=10.0,
    )  # fmt: skip
    base.update(kw)
    return QueueConfig(**base)


def _drain(client, stage, batch_size, handle):
    """Stage loop: get this step's rows until the step is exhausted for the stage."""
    seen = []
    while True:
        batch = client.get(stage, batch_size, timeout_s=10, sampler=StepSampler(0))
        if not len(batch):
            return seen
        handle(batch)
        client.ack(batch)
        seen += batch.row_ids


def _in_thread(fn):
    """Run fn in a thread; `join()` re-raises its exception in the caller."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the joining thread
            box["error"] = e

    th = threading.Thread(target=target)
    th.start()

    def join():
        th.join(20)
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def _pipeline_rank(rank, world_size, cfg, address):
    group = dist.new_group(backend="gloo", timeout=PG_TIMEOUT) if cfg.transport == "dist" else None
    client = connect(cfg, rank, address=address, group=group)
    seen = {}
    if rank < 2:  # producer of prompts, with the reward stage running in a second thread

        def reward(batch):
            resp = batch.columns["response"]
            for p, r in zip(batch.columns["prompt"], resp.rows(), strict=True):
                assert torch.equal(r, p.repeat(2)[: r.shape[0]] + 1), "response corrupted"
            client.put({"reward": resp.lengths.float()}, rows=batch.row_ids)

        join = _in_thread(lambda: _drain(client, "reward", 5, reward))
        for i in range(0, ROWS_PER_PRODUCER, 8):
            base = (rank * ROWS_PER_PRODUCER + i) * 100
            prompt = base + torch.arange(64).view(8, 8) // 8 * 100 + torch.arange(8)
            client.put({"prompt": prompt}, timeout_s=10)
        seen["reward"] = join()
    else:  # rollout and train, each in its own thread

        def rollout(batch):
            resp = [p.repeat(2)[: 1 + int(p[0] // 100) % 16] + 1 for p in batch.columns["prompt"]]
            client.put({"response": resp}, rows=batch.row_ids, policy_versions=[rank] * len(batch))

        def train(batch):
            assert torch.equal(batch.columns["reward"], batch.columns["response"].lengths.float())
            resp = batch.columns["response"]
            for p, r in zip(batch.columns["prompt"], resp.rows(), strict=True):
                assert torch.equal(r, p.repeat(2)[: r.shape[0]] + 1), "response corrupted"

        # rows of each batch live on up to four ranks: prompt and reward on 0-1, response on 2-3
        join = _in_thread(lambda: _drain(client, "train", 6, train))
        seen["rollout"] = _drain(client, "rollout", 7, rollout)
        seen["train"] = join()
    if group is not None:
        dist.barrier(group=group)  # nobody closes the data plane while a peer may still pull
    client.close()
    return seen


@pytest.mark.parametrize("transport", ["shm", "dist"])
def test_every_row_reaches_every_stage_exactly_once(transport):
    num_rows = 2 * ROWS_PER_PRODUCER
    cfg = pipeline_cfg(transport, num_rows)
    server = serve(cfg)
    try:
        out = run_ranks(_pipeline_rank, 4, cfg=cfg, address=server.address)
    finally:
        server.close()
    for stage in ("rollout", "reward", "train"):
        rows = [r for res in out.values() for r in res.get(stage, [])]
        assert sorted(rows) == list(range(num_rows)), stage
    assert server.controller.stats()["num_rows"] == 0  # everything freed


def _killed_rank(rank, world_size, cfg, address):
    client = connect(cfg, rank, address=address)
    if rank == 0:
        client.put({"prompt": torch.arange(16 * 8).view(16, 8)})
        dist.barrier()  # rows are in
        dist.barrier()  # rank 1 holds a lease
        got = []
        while len(got) < 16:
            batch = client.get("rollout", 16, timeout_s=5)
            assert len(batch), f"rows lost: only {sorted(got)} delivered"
            client.ack(batch)
            got += batch.row_ids
        client.close()
        return got
    dist.barrier()
    batch = client.get("rollout", 5, timeout_s=5)
    assert len(batch) == 5
    dist.barrier()
    os._exit(0)  # die holding the lease: no ack, no close


def test_killed_consumer_rows_are_redelivered():
    cfg = pipeline_cfg("shm", 16, stages=[StageSpec("rollout", ["prompt"])])
    server = serve(cfg)
    try:
        out = run_ranks(_killed_rank, 2, may_die=(1,), cfg=cfg, address=server.address)
    finally:
        server.close()
    assert sorted(out[0]) == list(range(16))  # each row exactly once, the dead rank's 5 included


def _wake_rank(rank, world_size, cfg, address):
    client = connect(cfg, rank, address=address)
    lat = []
    for i in range(10):
        dist.barrier()
        if rank == 0:
            # Not a wait for a state: rank 1's get is parked in the test process's controller,
            # which these forked ranks cannot see. Nothing can hang on it (the get times out in
            # 5 s and a late put still reaches it); the pause only makes the measured latency
            # that of a get already parked when the put comes.
            time.sleep(0.05)
            t_put = time.time()
            client.put({"prompt": torch.full((1, 8), i)})
            lat.append(t_put)
        else:
            batch = client.get("rollout", 1, timeout_s=5)
            lat.append(time.time())
            assert int(batch.columns["prompt"][0, 0]) == i
            client.ack(batch)
    dist.barrier()
    client.close()
    return lat


def test_blocking_get_wakes_within_milliseconds_of_put():
    cfg = pipeline_cfg("shm", 10, stages=[StageSpec("rollout", ["prompt"])])
    server = serve(cfg)
    try:
        out = run_ranks(_wake_rank, 2, cfg=cfg, address=server.address)
    finally:
        server.close()
    delays_ms = sorted((w - p) * 1e3 for p, w in zip(out[0], out[1], strict=True))
    assert all(d > 0 for d in delays_ms)
    assert delays_ms[len(delays_ms) // 2] < 5.0, delays_ms  # median: a put wakes a parked get fast
    assert delays_ms[-1] < 50.0, delays_ms


def _capacity_rank(rank, world_size, cfg, address):
    client = connect(cfg, rank, address=address)
    if rank == 0:
        client.put({"prompt": torch.zeros(4, 8, dtype=torch.int64)})
        dist.barrier()
        t0 = time.time()
        client.put({"prompt": torch.ones(2, 8, dtype=torch.int64)}, timeout_s=5)  # blocks: full
        result = t0, time.time()
    else:
        dist.barrier()
        # deliberate: nothing frees rows for 0.3 s, so rank 0's put must stay blocked that long
        time.sleep(0.3)
        t_ack = time.time()
        client.ack(client.get("rollout", 2, timeout_s=5))
        result = t_ack
    dist.barrier()
    client.close()
    return result


def test_capacity_blocks_put_until_a_stage_frees_rows():
    cfg = pipeline_cfg("shm", 6, capacity_rows=4, stages=[StageSpec("rollout", ["prompt"])])
    server = serve(cfg)
    try:
        out = run_ranks(_capacity_rank, 2, cfg=cfg, address=server.address)
    finally:
        server.close()
    t0, t_done = out[0]
    t_ack = out[1]
    assert t_done >= t_ack and t_done - t0 >= 0.25  # blocked until the ack freed rows
    assert t_done - t_ack < 0.1  # and released promptly
    assert server.controller.stats()["num_rows"] == 4


GROUP, NUM_GROUPS = 4, 6


def _sampler_rank(rank, world_size, cfg, address):
    client = connect(cfg, rank, address=address)
    if rank == 0:  # producer, then the advantage stage (whole groups only)
        for g in range(NUM_GROUPS):
            client.put({"prompt": torch.full((GROUP, 8), g)}, group_ids=[g] * GROUP,
                       num_tokens=[10 * (g + 1) + i for i in range(GROUP)])  # fmt: skip
        batches = []
        while True:
            b = client.get("advantage", 6, timeout_s=10, sampler=GroupSampler())
            assert len(b) == GROUP, f"group sampler returned {len(b)} rows: {b.group_ids}"
            batches.append(b.group_ids)
            client.put({"reward": torch.zeros(len(b))}, rows=b.row_ids)
            client.ack(b)
            if len(batches) == NUM_GROUPS:
                break
        result = batches
    else:  # a data-parallel train mesh of 2 ranks
        result = []
        while True:
            b = client.get_balanced("train", rank - 1, 2, 4, timeout_s=10, sampler=StepSampler(0))
            result.append((b.row_ids, sum(b.num_tokens)))
            if not len(b):
                break
            client.ack(b)
    dist.barrier()
    client.close()
    return result


def test_group_and_dp_balanced_samplers_keep_their_promises():
    cfg = pipeline_cfg(
        "shm", GROUP * NUM_GROUPS, group_size=GROUP,
        stages=[StageSpec("advantage", ["prompt"]), StageSpec("train", ["prompt", "reward"])],
    )  # fmt: skip
    server = serve(cfg)
    try:
        out = run_ranks(_sampler_rank, 3, cfg=cfg, address=server.address)
    finally:
        server.close()
    assert all(len(set(g)) == 1 for g in out[0]) and sorted(g[0] for g in out[0]) == list(
        range(NUM_GROUPS)
    )
    r1, r2 = out[1], out[2]
    assert len(r1) == len(r2)  # same number of micro-batches on every rank of the mesh
    for (rows1, tok1), (rows2, tok2) in zip(r1, r2, strict=True):
        assert abs(len(rows1) - len(rows2)) <= 1
        if rows1 and rows2:
            assert abs(tok1 - tok2) <= 40, (tok1, tok2)
    rows = [r for rows, _ in r1 + r2 for r in rows]
    assert sorted(rows) == list(range(GROUP * NUM_GROUPS))


def _pull_from_each_other(rank: int, world_size: int) -> list[str]:
    schema = Schema([ColumnSpec("a", "int64", [4])])
    storage = MemoryStorage(schema)
    storage.write(list(range(8)), {"a": torch.arange(32).view(8, 4) + 1000 * rank})
    group = dist.new_group(backend="gloo", timeout=PG_TIMEOUT)
    transport = DistTransport(schema, storage, group)
    bad = []
    for it in range(10):
        dist.barrier(group=group)
        # rank 0 asks for scattered slots (a request with a body), rank 1 for a slot range; both
        # draw the same reply tag, so rank 0's body and rank 1's answer meet on one tag and pair
        slots = [0, 2, 4] if rank == 0 else [1, 2, 3]
        got = transport.start(1 - rank, [("a", slots)])()[0]
        want = torch.arange(32).view(8, 4)[slots] + 1000 * (1 - rank)
        if not torch.equal(got, want):
            bad.append(f"pull {it}: rows {got[:, 0].tolist()}, want {want[:, 0].tolist()}")
    # a request that arrives between the STOPs of a close must not hang the serving thread: rank
    # 0 plays the close by hand (one STOP, a request, the other STOPs), then rank 1 closes
    stop = torch.tensor([_STOP, 0, 0, 0, 0])
    if rank == 0:
        dist.send(stop, dst=1, group=group, tag=_TAG_REQ)
        transport.start(1, [("a", [5, 6])])()
        for _ in range(_POSTED - 1):
            dist.send(stop, dst=1, group=group, tag=_TAG_REQ)
        dist.barrier(group=group)  # rank 1's close()
    else:
        transport._thread.join(timeout=10)
        if transport._thread.is_alive():
            bad.append("serving thread alive after a STOP for every posted receive")
        transport.close()
    transport._thread.join(timeout=10)
    return bad


def test_ranks_pulling_from_each_other_get_their_own_rows():
    assert run_ranks(_pull_from_each_other, 2, timeout_s=40) == {0: [], 1: []}


def _failed_read_rank(rank, world_size, cfg, address):
    """Rank 0 owns the rows and its storage fails one read (a bug's stand-in). Rank 1's pull is
    never answered: the data group's timeout ends it (gloo then closes that pair). Rank 2 pulls
    the same rows, given back, from the same serving thread."""
    from datetime import timedelta

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=2))
    client = connect(cfg, rank, address=address, group=group)
    out = []
    if rank == 0:
        read, calls = client.storage.read, []

        def read_once_broken(*args, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise KeyError("storage bug")
            return read(*args, **kw)

        client.storage.read = read_once_broken
        client.put({"prompt": torch.full((2, 8), 7)}, num_tokens=[1, 1])
    dist.barrier()
    if rank == 1:
        with pytest.raises(RuntimeError):
            client.get("rollout", 2, timeout_s=5)
    dist.barrier()
    if rank == 2:
        batch = client.get("rollout", 2, timeout_s=5)
        out = batch.columns["prompt"][:, 0].tolist()
        client.ack(batch)
    dist.barrier()  # no client.close(): it is collective over the data group, whose 0-1 pair
    return out  # the timeout closed


def test_a_failed_request_leaves_the_serving_thread_answering_the_next():
    cfg = pipeline_cfg("dist", 2)
    server = serve(cfg)
    try:
        assert run_ranks(_failed_read_rank, 3, timeout_s=60, cfg=cfg, address=server.address) == {
            0: [], 1: [], 2: [7, 7]}  # fmt: skip
    finally:
        server.close()


def _idle_owner(rank, world_size):
    from datetime import timedelta

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=1))
    schema = Schema([ColumnSpec("x", "int64", [4])])
    storage = MemoryStorage(schema)
    if rank == 0:
        storage.write([0, 1], {"x": torch.arange(8).view(2, 4)})
    plane = DistTransport(schema, storage, group)
    dist.barrier()
    # deliberate: nobody pulls for longer than the data group's timeout (1 s); the owner's
    # serving thread must still answer afterwards
    time.sleep(1.5)
    out = plane.start(0, [("x", [0, 1])])()[0].tolist() if rank == 1 else None
    dist.barrier()
    plane.close()
    return out


def test_an_owner_idle_longer_than_the_group_timeout_still_answers():
    assert run_ranks(_idle_owner, 2, timeout_s=40) == {0: None, 1: [[0, 1, 2, 3], [4, 5, 6, 7]]}
