"""Property test: random interleavings of puts, gets, acks, nacks, consumer failures and
checkpoints against a plain model. No row lost, none duplicated, none delivered early; also a
second producer's unwritten reservations (`release`, expiry, a checkpoint while they are open:
no row id is ever handed out twice), policy versions carried to the grants, and each stage's exact
FIFO order after nack, expiry and restore."""

import json

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from asyncflow.queue import ColumnSpec, Controller, GroupSampler, QueueConfig, StageSpec

COLS = ["x", "y"]
NEEDS = {"a": {"x"}, "b": {"x", "y"}, "g": {"y"}}
CAPACITY = 8
GROUP = 2
UNKNOWN = -1


def make_cfg():
    return QueueConfig(
        columns=[ColumnSpec(c, "int64", [2]) for c in COLS],
        stages=[StageSpec(s, sorted(n)) for s, n in NEEDS.items()],
        capacity_rows=CAPACITY,
        group_size=GROUP,
    )


class QueueModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.ctl = Controller(make_cfg())
        self.cols: dict[int, set[str]] = {}
        self.consumed: dict[int, set[str]] = {}
        self.group: dict[int, int] = {}
        self.version: dict[int, int] = {}
        self.freed: set[int] = set()
        self.freed_reported: set[tuple[int, int]] = set()
        self.leases: dict[int, tuple[str, str, list[int]]] = {}
        self.reserved: dict[int, int] = {}  # unwritten rows of producer p1 -> group
        self.committed_ever: set[int] = set()
        self.order: dict[str, list[int]] = {s: [] for s in NEEDS}
        self.next_group = 0

    # ---------------------------------------------------------------- helpers

    def leased(self, stage):
        return {r for s, _, rows in self.leases.values() if s == stage for r in rows}

    def eligible(self, stage):
        held = self.leased(stage)
        return {r for r, c in self.cols.items()
                if NEEDS[stage] <= c and stage not in self.consumed[r] and r not in held}

    def consume(self, stage, rows):
        for r in rows:
            self.consumed[r].add(stage)
            if self.consumed[r] == set(NEEDS):
                del self.cols[r], self.consumed[r], self.group[r], self.version[r]
                self.freed.add(r)

    def became_ready(self, rows, before):
        for r in rows:
            for s, needs in NEEDS.items():
                if needs <= self.cols[r] and not needs <= before.get(r, set()):
                    self.order[s].append(r)

    def new_ids_ok(self, ids):
        assert not set(ids) & self.committed_ever, "row id of a stored or freed row handed out again"
        assert not set(ids) & set(self.cols) and not set(ids) & set(self.reserved)

    def commit_new(self, ids, gids, cols, versions):
        self.ctl.commit("p", 0, ids, cols, ids, policy_versions=versions)
        for r, g, v in zip(ids, gids, versions, strict=True):
            self.cols[r], self.consumed[r], self.group[r], self.version[r] = set(cols), set(), g, v
        self.committed_ever |= set(ids)
        self.became_ready(ids, {})

    # ---------------------------------------------------------------- rules

    @rule(num_groups=st.integers(1, 2), cols=st.sampled_from([["x"], ["y"], ["x", "y"]]),
          data=st.data())
    def put_new(self, num_groups, cols, data):
        n = num_groups * GROUP
        gids = [self.next_group + i // GROUP for i in range(n)]
        versions = data.draw(st.lists(st.sampled_from([UNKNOWN, 1, 3]), min_size=n, max_size=n))
        if len(self.cols) + len(self.reserved) + n > CAPACITY:
            with pytest.raises(TimeoutError):
                self.ctl.reserve("p", n, group_ids=gids, timeout_s=0)
            return
        self.next_group += num_groups
        ids = self.ctl.reserve("p", n, group_ids=gids, timeout_s=0)
        self.new_ids_ok(ids)
        self.commit_new(ids, gids, cols, versions)

    @rule()
    def reserve_only(self):
        """Producer p1 reserves a group and has not written it yet."""
        gids = [self.next_group] * GROUP
        if len(self.cols) + len(self.reserved) + GROUP > CAPACITY:
            return
        self.next_group += 1
        ids = self.ctl.reserve("p1", GROUP, group_ids=gids, timeout_s=0)
        self.new_ids_ok(ids)
        self.reserved.update(dict.fromkeys(ids, gids[0]))

    @precondition(lambda self: self.reserved)
    @rule(data=st.data(), cols=st.sampled_from([["x"], ["y"], ["x", "y"]]))
    def commit_reserved(self, data, cols):
        g = data.draw(st.sampled_from(sorted(set(self.reserved.values()))))
        ids = sorted(r for r, gg in self.reserved.items() if gg == g)
        for r in ids:
            del self.reserved[r]
        self.commit_new(ids, [g] * len(ids), cols, [UNKNOWN] * len(ids))

    @rule(data=st.data())
    def release(self, data):
        """release: unwritten rows are dropped (capacity back), written or freed rows untouched."""
        pool = sorted(set(self.reserved) | set(self.cols) | self.freed)
        if not pool:
            return
        rows = data.draw(st.lists(st.sampled_from(pool), max_size=3, unique=True))
        self.ctl.release(rows)
        for r in rows:
            self.reserved.pop(r, None)

    @precondition(lambda self: any(len(c) < len(COLS) for c in self.cols.values()))
    @rule(data=st.data())
    def put_column(self, data):
        row = data.draw(st.sampled_from(sorted(r for r, c in self.cols.items() if len(c) < len(COLS))))
        col = data.draw(st.sampled_from(sorted(set(COLS) - self.cols[row])))
        before = {row: set(self.cols[row])}
        self.ctl.commit("p", 1, [row], [col], [row])
        self.cols[row].add(col)
        self.became_ready([row], before)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def put_to_freed_row_is_refused(self, data):
        row = data.draw(st.sampled_from(sorted(self.freed)))
        before = self.ctl.state_dict()
        with pytest.raises(ValueError, match="freed"):
            self.ctl.commit("p", 0, [row], ["x"], [row])
        assert self.ctl.state_dict() == before

    def available(self, stage, group):
        eligible = self.eligible(stage)
        if not group:
            return eligible
        return {r for r in eligible
                if sum(self.group[o] == self.group[r] for o in eligible) == GROUP}

    @rule(stage=st.sampled_from(sorted(NEEDS)), consumer=st.sampled_from(["c0", "c1", "c2"]),
          batch_size=st.integers(1, 5), group=st.booleans(), min_rows=st.integers(1, 3))
    def get(self, stage, consumer, batch_size, group, min_rows):
        min_rows = min(min_rows, batch_size)
        if group and batch_size < GROUP:
            before = self.ctl.state_dict()
            with pytest.raises(ValueError):
                self.ctl.get(consumer, stage, batch_size, timeout_s=0, sampler=GroupSampler(),
                             min_rows=min_rows)
            assert self.ctl.state_dict() == before, "a refused get changed the queue"
            return
        sampler = GroupSampler() if group else None
        g = self.ctl.get(consumer, stage, batch_size, timeout_s=0, sampler=sampler,
                         min_rows=min_rows)
        rows = g.row_ids
        available = self.available(stage, group)
        if len(available) < min_rows:
            assert not rows
            return
        assert len(rows) == len(set(rows)) <= batch_size
        assert set(rows) <= available, "delivered a row not ready, already consumed, or leased"
        assert g.policy_versions == [self.version[r] for r in rows], "policy version lost"
        if group:
            by_group: dict[int, int] = {}
            for r in rows:
                by_group[self.group[r]] = by_group.get(self.group[r], 0) + 1
            assert all(v == GROUP for v in by_group.values())
            assert len(rows) == min(len(available), batch_size // GROUP * GROUP)
        else:
            assert len(rows) == min(batch_size, len(available))
            assert rows == self.order[stage][:len(rows)], "FIFO order broken"
        self.order[stage] = [r for r in self.order[stage] if r not in set(rows)]
        self.leases[g.lease_id] = (stage, consumer, rows)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def ack(self, data):
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        stage, _, rows = self.leases.pop(lease_id)
        self.ctl.ack(lease_id)
        self.consume(stage, rows)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def nack(self, data):
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        stage, _, rows = self.leases.pop(lease_id)
        self.ctl.nack(lease_id)
        self.order[stage] = rows + self.order[stage]

    @rule(consumer=st.sampled_from(["c0", "c1", "c2", "p1"]))
    def consumer_dies(self, consumer):
        mine = sorted(k for k, v in self.leases.items() if v[1] == consumer)
        n = self.ctl.expire_consumer(consumer)
        assert n == sum(len(self.leases[k][2]) for k in mine)
        for k in reversed(mine):  # newest first: the oldest end up in front
            stage, _, rows = self.leases.pop(k)
            self.order[stage] = rows + self.order[stage]
        for k in mine:
            with pytest.raises(ValueError):
                self.ctl.ack(k)
        if consumer == "p1":
            self.reserved.clear()

    @rule()
    def checkpoint_and_restore(self):
        state = json.loads(json.dumps(self.ctl.state_dict()))
        old = self.ctl
        self.ctl = Controller(make_cfg())
        self.ctl.load_state_dict(state)
        for s in NEEDS:
            leased = [r for k in sorted(self.leases) for r in self.leases[k][2]
                      if self.leases[k][0] == s]
            self.order[s] = leased + self.order[s]
        self.leases.clear()
        self.reserved.clear()  # unwritten reservations are not saved
        # the freed lists of the old controller went into the state; re-read them from the new one
        del old

    # ---------------------------------------------------------------- invariants

    @invariant()
    def ready_sets_match_model(self):
        stats = self.ctl.stats()
        assert stats["num_rows"] == len(self.cols) + len(self.reserved)
        assert stats["num_leases"] == len(self.leases)
        for stage in NEEDS:
            assert stats[f"ready/{stage}"] == len(self.eligible(stage)), stage
            assert list(self.ctl._stages[stage].ready) == self.order[stage], stage

    @invariant()
    def freed_rows_reported_once(self):
        for owner in (0, 1):
            for slot, row in self.ctl.take_freed(owner):
                assert slot == row and row in self.freed and (owner, row) not in self.freed_reported
                self.freed_reported.add((owner, row))


QueueModel.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_controller_matches_model = QueueModel.TestCase
