"""Controller semantics, single process: readiness, leases, samplers, capacity, errors, state."""

import threading
import time

import pytest
import torch

from asyncflow.queue import (
    ColumnSpec,
    Controller,
    GroupRangeSampler,
    GroupSampler,
    QueueConfig,
    StageSpec,
    StepSampler,
    balance_by_tokens,
)

from ..waiting import num_waiting, wait_until


def make_cfg(**kw):
    base = dict(
        columns=[ColumnSpec("prompt", "int64", [4]), ColumnSpec("response", "int64", [8], ragged=True),
                 ColumnSpec("reward", "float32", [])],
        stages=[StageSpec("rollout", ["prompt"]), StageSpec("reward", ["response"]),
                StageSpec("train", ["prompt", "response", "reward"])],
        capacity_rows=16,
    )  # fmt: skip
    base.update(kw)
    return QueueConfig(**base)


def put(ctl, n, cols=("prompt",), step=0, group_ids=None, consumer="p", versions=None):
    ids = ctl.reserve(consumer, n, step=step, group_ids=group_ids)
    ctl.commit(consumer, 0, ids, list(cols), ids, policy_versions=versions)
    return ids


def test_row_reaches_stage_only_when_all_needed_columns_ready():
    ctl = Controller(make_cfg())
    ids = put(ctl, 2)
    assert ctl.num_ready("rollout") == 2 and ctl.num_ready("train") == 0
    ctl.commit("p", 0, ids, ["response"], ids)
    assert ctl.num_ready("reward") == 2 and ctl.num_ready("train") == 0
    ctl.commit("p", 0, ids[:1], ["reward"], ids[:1])
    g = ctl.get("c", "train", 8, timeout_s=0)
    assert g.row_ids == ids[:1]
    assert set(g.locations) == {"prompt", "response", "reward"}


def test_fifo_order_and_lease_excludes_rows_from_other_gets_of_same_stage():
    ctl = Controller(make_cfg())
    ids = put(ctl, 5)
    a = ctl.get("c1", "rollout", 3, timeout_s=0)
    b = ctl.get("c2", "rollout", 3, timeout_s=0)
    assert a.row_ids == ids[:3] and b.row_ids == ids[3:]
    assert ctl.get("c3", "rollout", 3, timeout_s=0).row_ids == []


def test_nack_and_expire_return_rows_to_front():
    ctl = Controller(make_cfg())
    ids = put(ctl, 4)
    a = ctl.get("c1", "rollout", 2, timeout_s=0)
    ctl.nack(a.lease_id)
    assert ctl.get("c2", "rollout", 2, timeout_s=0).row_ids == ids[:2]
    b = ctl.get("c3", "rollout", 2, timeout_s=0)
    assert ctl.expire_consumer("c3") == 2
    assert ctl.get("c4", "rollout", 4, timeout_s=0).row_ids == b.row_ids
    with pytest.raises(ValueError, match="not held"):
        ctl.ack(b.lease_id)  # the expired consumer's late ack is refused


def test_row_freed_after_every_stage_acked_and_owner_told():
    ctl = Controller(make_cfg(stages=[StageSpec("a", ["prompt"]), StageSpec("b", ["prompt"])]))
    ids = put(ctl, 2)
    ctl.ack(ctl.get("c", "a", 2, timeout_s=0).lease_id)
    assert ctl.stats()["num_rows"] == 2 and ctl.take_freed(0) == []
    ctl.ack(ctl.get("c", "b", 2, timeout_s=0).lease_id)
    assert ctl.stats()["num_rows"] == 0
    assert sorted(ctl.take_freed(0)) == [(i, i) for i in ids]


def test_blocking_get_wakes_on_commit():
    ctl = Controller(make_cfg())
    got = {}

    def consumer():
        got["grant"] = ctl.get("c", "rollout", 4, timeout_s=5)
        got["t_woken"] = time.monotonic()

    th = threading.Thread(target=consumer)
    th.start()
    wait_until(lambda: num_waiting(ctl._stages["rollout"].cond) == 1, what="get parked")
    t_put = time.monotonic()
    put(ctl, 1)
    th.join(5)
    assert len(got["grant"].row_ids) == 1
    assert got["t_woken"] - t_put < 0.05  # woken by the commit, not by the 5 s timeout


def test_get_timeout_returns_empty_grant():
    ctl = Controller(make_cfg())
    t0 = time.monotonic()
    g = ctl.get("c", "rollout", 4, timeout_s=0.05)
    assert g.row_ids == [] and g.lease_id == -1 and time.monotonic() - t0 >= 0.05


def test_min_rows_waits_for_enough_rows():
    ctl = Controller(make_cfg())
    put(ctl, 2)
    assert ctl.get("c", "rollout", 4, timeout_s=0, min_rows=3).row_ids == []
    put(ctl, 1)
    assert len(ctl.get("c", "rollout", 4, timeout_s=0, min_rows=3).row_ids) == 3


def test_capacity_blocks_put_until_rows_freed():
    ctl = Controller(make_cfg(capacity_rows=4, stages=[StageSpec("a", ["prompt"])]))
    put(ctl, 4)
    with pytest.raises(TimeoutError, match="queue full"):
        ctl.reserve("p", 1, timeout_s=0.05)
    done = {}

    def producer():
        done["ids"] = ctl.reserve("p", 2, timeout_s=5)

    th = threading.Thread(target=producer)
    th.start()
    wait_until(lambda: num_waiting(ctl._space) == 1, what="reserve parked")
    assert "ids" not in done
    ctl.ack(ctl.get("c", "a", 2, timeout_s=0).lease_id)
    th.join(5)
    assert done["ids"] == [4, 5]


def test_group_sampler_returns_only_whole_groups():
    ctl = Controller(make_cfg(group_size=3))
    put(ctl, 2, group_ids=[7, 7])
    put(ctl, 3, group_ids=[8, 8, 8])
    g = ctl.get("c", "rollout", 5, timeout_s=0, sampler=GroupSampler())
    assert sorted(g.group_ids) == [8, 8, 8]
    assert ctl.get("c", "rollout", 5, timeout_s=0, sampler=GroupSampler()).row_ids == []
    put(ctl, 1, group_ids=[7])
    g = ctl.get("c", "rollout", 5, timeout_s=0, sampler=GroupSampler())
    assert sorted(g.group_ids) == [7, 7, 7]
    with pytest.raises(ValueError, match="group_size"):
        ctl.get("c", "rollout", 2, sampler=GroupSampler())
    with pytest.raises(ValueError, match="would hold 4 rows"):
        ctl.reserve("p", 1, group_ids=[8])
    before = ctl.state_dict()
    with pytest.raises(ValueError, match="group_ids must be >= 0"):  # negative: rows of no group
        ctl.reserve("p", 3, group_ids=[-1, -1, -1])
    assert ctl.state_dict() == before
    old = {**before, "rows": [[r[0], r[1], -5, *r[3:]] for r in before["rows"]]}  # older format
    with pytest.raises(ValueError, match="negative group ids"):
        ctl.load_state_dict(old)
    assert ctl.state_dict() == before


def test_group_range_sampler_waits_for_every_group_and_orders_rows():
    ctl = Controller(make_cfg(group_size=2))
    b = put(ctl, 2, group_ids=[1, 1])
    put(ctl, 2, group_ids=[5, 5])  # outside the range: never taken
    a = put(ctl, 1, group_ids=[0])
    sampler = GroupRangeSampler(0, 2)
    assert ctl.get("c", "rollout", 8, timeout_s=0.05, sampler=sampler).row_ids == []  # 0 partial
    a += put(ctl, 1, group_ids=[0])
    got = ctl.get("c", "rollout", 8, timeout_s=0, sampler=sampler)
    assert got.row_ids == a + b and got.group_ids == [0, 0, 1, 1]  # group order, not arrival
    with pytest.raises(ValueError, match="hold 2 rows > batch_size=1"):
        ctl.get("c", "rollout", 1, timeout_s=0, sampler=GroupRangeSampler(5, 6))


def test_step_sampler_returns_rest_of_step_then_empty_at_once():
    ctl = Controller(make_cfg(rows_per_step=3))
    put(ctl, 2, step=0)
    put(ctl, 3, step=1)
    put(ctl, 1, step=0)
    g = ctl.get("c", "rollout", 8, timeout_s=0, sampler=StepSampler(0), min_rows=8)
    assert g.steps == [0, 0, 0]  # min_rows capped by the rows left in the step
    t0 = time.monotonic()
    done = ctl.get("c", "rollout", 8, timeout_s=5, sampler=StepSampler(0))
    assert done.row_ids == [] and done.exhausted  # the step is done, not a timeout
    assert time.monotonic() - t0 < 1.0
    timed_out = ctl.get("c", "rollout", 8, timeout_s=0.05, sampler=StepSampler(2))
    assert timed_out.row_ids == [] and not timed_out.exhausted


def test_balance_by_tokens_equal_counts_and_close_sums():
    tokens = [8, 7, 6, 5, 4, 3, 2, 1]
    parts = balance_by_tokens(list(range(8)), tokens, 2)
    assert sorted(len(p) for p in parts) == [4, 4]
    assert [sum(tokens[i] for i in p) for p in parts] == [18, 18]
    naive = [sum(tokens[:4]), sum(tokens[4:])]  # what taking rows in order would give: 26 vs 10
    assert naive == [26, 10]
    assert sorted(len(p) for p in balance_by_tokens(list(range(5)), [1] * 5, 3)) == [1, 2, 2]


def test_get_balanced_answers_all_ranks_together():
    ctl = Controller(make_cfg())
    ids = ctl.reserve("p", 8)
    ctl.commit("p", 0, ids, ["prompt"], ids, num_tokens=[50, 40, 30, 20, 10, 5, 5, 5])
    out = {}

    def rank(r):
        out[r] = ctl.get_balanced(f"c{r}", "rollout", r, 2, 4, timeout_s=5)

    ths = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(5)
    assert len(out[0].row_ids) == len(out[1].row_ids) == 4
    assert sorted(out[0].row_ids + out[1].row_ids) == ids
    assert abs(sum(out[0].num_tokens) - sum(out[1].num_tokens)) <= 10


def test_get_balanced_round_times_out_empty_for_everyone():
    ctl = Controller(make_cfg())
    put(ctl, 4)
    assert ctl.get_balanced("c0", "rollout", 0, 2, 4, timeout_s=0.05).row_ids == []
    # rank 1 arrives late for round 0: the round was cancelled, it gets an empty batch too
    assert ctl.get_balanced("c1", "rollout", 1, 2, 4, timeout_s=0.05).row_ids == []
    assert ctl.num_ready("rollout") == 4


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: c.commit("p", 0, [0], ["nope"], [0]), "unknown column"),
        (lambda c: c.get("c", "nope", 4), "unknown stage"),
        (lambda c: c.get("c", "rollout", 0), "batch_size=0"),
        (lambda c: c.get("c", "rollout", 4, min_rows=5), "min_rows=5"),
        (lambda c: c.get("c", "rollout", 4, columns=["reward"]), "does not wait for"),
        (lambda c: c.commit("p", 0, [0], ["prompt"], [0]), "already stored"),
        (lambda c: c.commit("p", 0, [99], ["prompt"], [0]), "never reserved"),
        (lambda c: c.reserve("p", 17), "num_rows=17"),
        (lambda c: c.ack(12345), "not held"),
        # a bad element late in a list: refused before the first row is touched
        (lambda c: c.commit("p", 0, [0, 1], ["response"], [0, "x"]), "slots must hold integers"),
        (lambda c: c.commit("p", 0, [0, 1], ["response"], [0, 1], num_tokens=[5, 1.5]),
         "num_tokens must hold integers"),
        (lambda c: c.reserve("p", 2, group_ids=[0, 0.5]), "group_ids must hold integers"),
        (lambda c: c.get("c", "rollout", 4, timeout_s=float("nan")), "finite"),
        (lambda c: c.get("c", "rollout", 4, timeout_s=float("inf")), "finite"),
        (lambda c: c.get("c", "rollout", 4, timeout_s=1e10), "finite"),
        (lambda c: c.commit("p", 0, [0, 1], ["response"], [0, 1],
                            num_tokens=[5, torch.tensor(1.5)]), "num_tokens must hold integers"),
        (lambda c: c.load_state_dict({"rows": []}), "not a queue state"),
        (lambda c: c.load_state_dict({**c.state_dict(), "ready_order": {"rollout": [7]}}),
         "not a queue state"),
        (lambda c: c.load_state_dict({**c.state_dict(), "ready_order": {
            "rollout": [0, 0], "reward": [], "train": []}}), "a row twice"),
        (lambda c: c.load_state_dict({**c.state_dict(), "ready_order": {
            "rollout": [], "reward": [0], "train": []}}), "not ready for it"),
        # consumed by `reward` before its `response` is stored: never offered, cannot be
        (lambda c: c.load_state_dict({**c.state_dict(), "rows": [
            r[:6] + [0b010] + r[7:] for r in c.state_dict()["rows"]]}), "consumed rows"),
    ],
)
def test_bad_input_refused_and_state_unchanged(call, match):
    ctl = Controller(make_cfg())
    put(ctl, 2)
    before = ctl.state_dict()
    with pytest.raises(ValueError, match=match):
        call(ctl)
    assert ctl.state_dict() == before


def test_put_to_freed_row_refused():
    ctl = Controller(make_cfg(stages=[StageSpec("a", ["prompt"])]))
    ids = put(ctl, 1)
    ctl.ack(ctl.get("c", "a", 1, timeout_s=0).lease_id)
    with pytest.raises(ValueError, match="already freed"):
        ctl.commit("p", 0, ids, ["response"], ids)


def test_state_dict_roundtrip_redelivers_leased_rows():
    ctl = Controller(make_cfg(rows_per_step=4))
    ids = put(ctl, 4)
    leased = ctl.get("c", "rollout", 2, timeout_s=0)
    ctl.ack(ctl.get("c", "rollout", 1, timeout_s=0).lease_id)
    state = ctl.state_dict()
    new = Controller(make_cfg(rows_per_step=4))
    new.load_state_dict(state)
    assert new.get("c", "rollout", 8, timeout_s=0).row_ids == leased.row_ids + [ids[3]]
    assert new.reserve("p", 1) == [4]  # row ids continue, never reused
    assert new.get("c", "rollout", 8, timeout_s=0, sampler=StepSampler(0)).row_ids == []


def test_state_dict_with_an_older_reservation_unwritten_never_reuses_a_row_id():
    """Two producers overlap: A's reservation is still unwritten when B's later rows are stored
    (row 2) or already freed (row 1). Only A's ids above every written row are handed out again."""
    ctl = Controller(make_cfg(stages=[StageSpec("a", ["prompt"])]))
    a = ctl.reserve("A", 1)  # row 0, never written
    freed = put(ctl, 1, consumer="B")  # row 1
    ctl.ack(ctl.get("c", "a", 1, timeout_s=0).lease_id)
    stored = put(ctl, 1, consumer="B")  # row 2
    late = ctl.reserve("A", 1)  # row 3, never written: after every written row
    assert (a, freed, stored, late) == ([0], [1], [2], [3])
    state = ctl.state_dict()
    new = Controller(make_cfg(stages=[StageSpec("a", ["prompt"])]))
    new.load_state_dict(state)
    assert new.reserve("A", 2) == [3, 4]  # a re-run producer gets row 3 again, then new ids
    assert new.take_freed(0) == [(1, 1)]  # the freed row's entry names no live row
    assert new.get("c", "a", 8, timeout_s=0).row_ids == stored


def test_refused_get_leases_no_row():
    ctl = Controller(make_cfg())  # rows_per_step=0: a step sampler is refused
    put(ctl, 2, versions=[1, 1])
    with pytest.raises(ValueError, match="rows_per_step > 0"):
        ctl.get("c", "rollout", 4, sampler=StepSampler(0))
    assert ctl.num_ready("rollout") == 2 and ctl.stats()["num_leases"] == 0


def test_a_state_saved_with_a_stale_row_count_still_loads():
    """Checkpoints written while the queue still dropped stale rows carry `num_dropped_stale`."""
    ctl = Controller(make_cfg())
    ids = put(ctl, 2)
    new = Controller(make_cfg())
    new.load_state_dict({**ctl.state_dict(), "num_dropped_stale": 3})
    assert new.get("c", "rollout", 8, timeout_s=0).row_ids == ids


def test_a_state_whose_next_row_id_names_a_stored_row_hands_out_new_ids():
    """Such states were written before row ids stopped being reused (python -O)."""
    ctl = Controller(make_cfg())
    put(ctl, 3)
    state = {**ctl.state_dict(), "next_row_id": 1}
    new = Controller(make_cfg())
    new.load_state_dict(state)
    assert new.reserve("p", 2) == [3, 4]


def test_expired_consumer_rows_come_back_in_queue_order():
    ctl = Controller(make_cfg())
    ids = put(ctl, 6)
    ctl.get("dead", "rollout", 2, timeout_s=0)
    ctl.get("dead", "rollout", 2, timeout_s=0)
    ctl.expire_consumer("dead")
    assert ctl.get("c", "rollout", 8, timeout_s=0).row_ids == ids


def test_lease_ids_continue_across_load_state_dict():
    """A late ack of a lease taken before the load must not consume a lease taken after it."""
    ctl = Controller(make_cfg())
    put(ctl, 2)
    old = ctl.get("c1", "rollout", 2, timeout_s=0)
    ctl.load_state_dict(ctl.state_dict())
    new = ctl.get("c2", "rollout", 2, timeout_s=0)
    assert new.row_ids == old.row_ids and new.lease_id != old.lease_id
    with pytest.raises(ValueError, match="not held"):
        ctl.ack(old.lease_id)
    ctl.ack(new.lease_id)


def test_get_balanced_refused_call_does_not_advance_its_rank():
    ctl = Controller(make_cfg())
    ids = put(ctl, 4)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(0, ctl.get_balanced(
        "c0", "rollout", 0, 2, 2, timeout_s=5)), daemon=True)  # fmt: skip
    t.start()
    wait_until(lambda: ctl._rounds.open, what="rank 0 waits in round 0")
    with pytest.raises(ValueError, match="dp_size=3"):
        ctl.get_balanced("c1", "rollout", 1, 3, 2, timeout_s=5)
    out[1] = ctl.get_balanced("c1", "rollout", 1, 2, 2, timeout_s=5)  # joins round 0
    t.join(5)
    assert sorted(out[0].row_ids + out[1].row_ids) == ids


class _Broken:
    """A sampler whose `take` fails: the error of the last rank of a round."""

    def check(self, group_size, rows_per_step, batch_size):
        pass

    def wanted(self, st, min_rows, rows_per_step):
        return 1

    def available(self, st):
        return len(st.ready)

    def take(self, st, batch_size, groups):
        raise RuntimeError("sampler bug")


def test_get_balanced_error_of_the_last_rank_answers_the_others_at_once():
    ctl = Controller(make_cfg())
    put(ctl, 4)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(0, ctl.get_balanced(
        "c0", "rollout", 0, 2, 2, timeout_s=30, sampler=_Broken())), daemon=True)  # fmt: skip
    t.start()
    wait_until(lambda: ctl._rounds.open, what="rank 0 waits in round 0")
    with pytest.raises(RuntimeError, match="sampler bug"):
        ctl.get_balanced("c1", "rollout", 1, 2, 2, timeout_s=30, sampler=_Broken())
    t.join(5)
    assert not t.is_alive() and out[0].row_ids == []
    assert ctl.num_ready("rollout") == 4 and not ctl._rounds.open


def test_load_state_dict_answers_a_waiting_balanced_round_empty():
    ctl = Controller(make_cfg())
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(0, ctl.get_balanced(
        "c0", "rollout", 0, 2, 2, timeout_s=30)), daemon=True)  # fmt: skip
    t.start()
    wait_until(lambda: ctl._rounds.open, what="rank 0 waits in round 0")
    ctl.load_state_dict(Controller(make_cfg()).state_dict())
    t.join(5)
    assert not t.is_alive() and out[0].row_ids == []


def test_release_gives_back_the_capacity_of_an_unwritten_reservation():
    ctl = Controller(make_cfg(capacity_rows=2))
    ids = ctl.reserve("p", 2)
    ctl.commit("p", 0, ids[:1], ["prompt"], ids[:1])
    ctl.release(ids)  # the stored row stays
    assert ctl.stats()["num_rows"] == 1 and ctl.reserve("p", 1, timeout_s=0) == [2]


def test_commit_with_ack_lease_consumes_those_rows_in_the_same_step():
    """A stage putting its output for part of its batch: a checkpoint taken before the batch's
    ack must not hand those rows to the stage again (their output is already stored)."""
    ctl = Controller(make_cfg(stages=[StageSpec("rollout", ["prompt"]),
                                      StageSpec("reward", ["response"])]))  # fmt: skip
    ids = put(ctl, 4)
    g = ctl.get("c", "rollout", 4, timeout_s=0)
    before = ctl.state_dict()
    with pytest.raises(ValueError, match="not held by lease"):
        ctl.commit("c", 0, [ids[0], 99], ["response"], [0, 1], ack_lease=g.lease_id)
    with pytest.raises(ValueError, match="not held"):
        ctl.commit("c", 0, ids[:2], ["response"], ids[:2], ack_lease=g.lease_id + 1)
    assert ctl.state_dict() == before
    ctl.commit("c", 0, ids[:2], ["response"], ids[:2], ack_lease=g.lease_id)
    state = ctl.state_dict()
    assert state["ready_order"]["rollout"] == ids[2:]  # only the rows still to do come back
    assert state["ready_order"]["reward"] == ids[:2]
    ctl.nack(g.lease_id)  # gives back only the rest
    assert ctl.get("c", "rollout", 4, timeout_s=0).row_ids == ids[2:]
    new = Controller(make_cfg(stages=[StageSpec("rollout", ["prompt"]),
                                      StageSpec("reward", ["response"])]))  # fmt: skip
    new.load_state_dict(state)
    assert new.get("c", "rollout", 4, timeout_s=0).row_ids == ids[2:]
    last = new.get("c", "reward", 4, timeout_s=0)
    new.commit("c", 0, last.row_ids, ["reward"], last.row_ids, ack_lease=last.lease_id)
    assert new.stats()["num_leases"] == 1  # its last row ended the reward lease; rollout's left
    with pytest.raises(ValueError, match="not held"):
        new.ack(last.lease_id)
