"""Property test: random interleavings of puts, gets, acks, nacks, consumer failures and
checkpoints against a plain model. No row lost, none duplicated, none delivered early."""

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
        self.freed: set[int] = set()
        self.freed_reported: set[int] = set()
        self.leases: dict[int, tuple[str, str, list[int]]] = {}
        self.next_group = 0

    # ---------------------------------------------------------------- helpers

    def leased(self, stage):
        return {r for s, _, rows in self.leases.values() if s == stage for r in rows}

    def eligible(self, stage):
        held = self.leased(stage)
        return {
            r for r, c in self.cols.items()
            if NEEDS[stage] <= c and stage not in self.consumed[r] and r not in held
        }  # fmt: skip

    def consume(self, stage, rows):
        for r in rows:
            self.consumed[r].add(stage)
            if self.consumed[r] == set(NEEDS):
                del self.cols[r], self.consumed[r], self.group[r]
                self.freed.add(r)

    # ---------------------------------------------------------------- rules

    @rule(num_groups=st.integers(1, 2), cols=st.sampled_from([["x"], ["y"], ["x", "y"]]))
    def put_new(self, num_groups, cols):
        n = num_groups * GROUP
        gids = [self.next_group + i // GROUP for i in range(n)]
        if len(self.cols) + n > CAPACITY:
            with pytest.raises(TimeoutError):
                self.ctl.reserve("p", n, group_ids=gids, timeout_s=0)
            return
        self.next_group += num_groups
        ids = self.ctl.reserve("p", n, group_ids=gids, timeout_s=0)
        assert not set(ids) & (set(self.cols) | self.freed)
        self.ctl.commit("p", 0, ids, cols, ids)
        for r, g in zip(ids, gids, strict=True):
            self.cols[r], self.consumed[r], self.group[r] = set(cols), set(), g

    @precondition(lambda self: any(len(c) < len(COLS) for c in self.cols.values()))
    @rule(data=st.data())
    def put_column(self, data):
        row = data.draw(
            st.sampled_from(sorted(r for r, c in self.cols.items() if len(c) < len(COLS)))
        )
        col = data.draw(st.sampled_from(sorted(set(COLS) - self.cols[row])))
        self.ctl.commit("p", 1, [row], [col], [row])
        self.cols[row].add(col)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def put_to_freed_row_is_refused(self, data):
        row = data.draw(st.sampled_from(sorted(self.freed)))
        before = self.ctl.state_dict()
        with pytest.raises(ValueError, match="freed"):
            self.ctl.commit("p", 0, [row], ["x"], [row])
        assert self.ctl.state_dict() == before

    def available(self, stage, group):
        """Rows a sampler could lease now: eligible ones, and for groups only whole groups."""
        eligible = self.eligible(stage)
        if not group:
            return eligible
        return {r for r in eligible if sum(self.group[o] == self.group[r] for o in eligible) == GROUP}

    @rule(stage=st.sampled_from(sorted(NEEDS)), consumer=st.sampled_from(["c0", "c1", "c2"]),
          batch_size=st.integers(1, 5), group=st.booleans(), count=st.integers(1, 3),
          min_rows=st.integers(1, 3))  # fmt: skip
    def get(self, stage, consumer, batch_size, group, count, min_rows):
        """`get_many` (`get` is its count=1): each grant is what a `get` would answer after the
        previous ones, and the list stops only when the next would have to wait."""
        min_rows = min(min_rows, batch_size)
        if group and batch_size < GROUP:
            with pytest.raises(ValueError):
                self.ctl.get_many(consumer, stage, batch_size, count, timeout_s=0,
                                  sampler=GroupSampler(), min_rows=min_rows)  # fmt: skip
            return
        sampler = GroupSampler() if group else None
        grants = self.ctl.get_many(consumer, stage, batch_size, count, timeout_s=0,
                                   sampler=sampler, min_rows=min_rows)  # fmt: skip
        assert 1 <= len(grants) <= count
        for k, g in enumerate(grants):
            rows = g.row_ids
            available = self.available(stage, group)
            if len(available) < min_rows:
                assert k == 0 and not rows, "leased fewer than min_rows, or did not stop"
                return
            assert len(rows) == len(set(rows)) <= batch_size
            assert set(rows) <= available, "delivered a row not ready, already consumed, or leased"
            if group:
                by_group: dict[int, int] = {}
                for r in rows:
                    by_group[self.group[r]] = by_group.get(self.group[r], 0) + 1
                assert all(v == GROUP for v in by_group.values())
                assert len(rows) == min(len(available), batch_size // GROUP * GROUP)
            else:
                assert len(rows) == min(batch_size, len(available))
            self.leases[g.lease_id] = (stage, consumer, rows)
        assert len(grants) == count or len(self.available(stage, group)) < min_rows, (
            "stopped although the next grant would not have had to wait"
        )

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
        self.leases.pop(lease_id)
        self.ctl.nack(lease_id)

    @rule(consumer=st.sampled_from(["c0", "c1", "c2"]))
    def consumer_dies(self, consumer):
        mine = [k for k, v in self.leases.items() if v[1] == consumer]
        n = self.ctl.expire_consumer(consumer)
        assert n == sum(len(self.leases.pop(k)[2]) for k in mine)
        for k in mine:
            with pytest.raises(ValueError):
                self.ctl.ack(k)

    @rule()
    def checkpoint_and_restore(self):
        state = json.loads(json.dumps(self.ctl.state_dict()))  # plain data only
        self.ctl = Controller(make_cfg())
        self.ctl.load_state_dict(state)
        self.leases.clear()  # leased rows are redelivered after a restore

    # ---------------------------------------------------------------- invariants

    @invariant()
    def ready_sets_match_model(self):
        stats = self.ctl.stats()
        assert stats["num_rows"] == len(self.cols)
        assert stats["num_leases"] == len(self.leases)
        for stage in NEEDS:
            assert stats[f"ready/{stage}"] == len(self.eligible(stage)), stage

    @invariant()
    def freed_rows_reported_once(self):
        for owner in (0, 1):  # put_new writes on rank 0, put_column on rank 1
            for slot, row in self.ctl.take_freed(owner):
                assert slot == row and row in self.freed and (owner, row) not in self.freed_reported
                self.freed_reported.add((owner, row))
        assert {r for _, r in self.freed_reported} == self.freed  # every owner told, none twice


QueueModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
test_controller_matches_model = QueueModel.TestCase
