"""Per-step metrics from several ranks and stages merge exactly on rank 0, in step order."""

import json

import torch.distributed as dist

from asyncflow.metrics import JsonlSink
from asyncflow.pipeline.recorder import StepRecorder
from asyncflow.pipeline.stage import Metrics

from ._mp import run_ranks


def _record(rank, world, tmp):
    sinks = [JsonlSink(tmp / "metrics.jsonl")] if rank == 0 else []
    stages = ["a", "b"] if rank == 0 else ["c"]
    rec = StepRecorder(stages, dist.new_group(list(range(world))), sinks)

    def report(stage, step, fill):  # what the schedule does with a stage's returned metrics
        m = Metrics(stage, step)
        fill(m)
        rec.add(m)
        rec.stage_done(stage, step)

    for step in range(3):
        if rank == 0:
            report("a", step, lambda m: m.mean("reward/mean", 1.0, weight=3))  # 3 rows of 1
            report("b", step, lambda m, s=step: m.max("staleness/max", s))
        else:
            def fill(m, s=step):
                m.mean("reward/mean", 0.0)  # one row of reward 0
                m.total("tokens", 10 * (s + 1))
                m.max("staleness/max", 5 if s == 1 else 0)
            report("c", step, fill)
    if rank == 0:  # a step only rank 0 records, flushed by finish()
        m = Metrics("a", 3)
        m.set("eval/accuracy", 0.5)
        rec.add(m)
    rec.finish()


def test_metrics_merge_across_ranks_in_step_order(tmp_path):
    run_ranks(_record, 2, tmp=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3]
    for x in lines[:3]:
        assert x["reward/mean"] == 0.75  # (3 * 1 + 1 * 0) / 4: weighted, not a mean of means
    assert [x["tokens"] for x in lines[:3]] == [10, 20, 30]
    assert [x["staleness/max"] for x in lines[:3]] == [0, 5, 2]
    assert lines[3] == {"step": 3, "eval/accuracy": 0.5}
