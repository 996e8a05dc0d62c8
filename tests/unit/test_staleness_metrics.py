"""The train stage's staleness figures, against a count done row by row."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from asyncflow.pipeline.stage import Metrics
from asyncflow.pipeline.trainer import TrainStage


def _record(version: int, max_staleness: int, versions: list[int]) -> Metrics:
    stage = SimpleNamespace(engine=SimpleNamespace(policy_version=version),
                            max_staleness=max_staleness)
    batch = SimpleNamespace(policy_versions=versions, row_ids=[100 + i for i in
                                                               range(len(versions))])
    m = Metrics("train", 7)
    TrainStage._record_staleness(stage, m, batch)
    return m


@pytest.mark.parametrize("versions", [[5] * 8, [4, 5, 5, 4, 4, 5, 5, 5], [3, 5, 4, 4]])
def test_counts_mean_and_max(versions):
    got = _record(5, 2, versions).values()
    stale = [5 - v for v in versions]
    assert got["staleness/max"] == max(stale)
    assert got["staleness/mean"] == pytest.approx(sum(stale) / len(stale))
    counts = {k: v for k, v in got.items() if k.startswith("staleness/count_")}
    assert counts == {f"staleness/count_{s}": float(stale.count(s)) for s in set(stale)}
    assert "staleness/violations" not in got


def test_a_row_past_the_bound_is_logged_and_counted(caplog):
    with caplog.at_level(logging.ERROR):
        got = _record(9, 1, [9, 8, 6, 9, 7]).values()
    assert got["staleness/violations"] == 2
    assert got["staleness/max"] == 3
    bad = [r.getMessage() for r in caplog.records]
    assert bad == ["row 102 has staleness 3 > max_staleness 1",
                   "row 104 has staleness 2 > max_staleness 1"]
