"""Per-step metrics from several ranks and stages merge exactly on rank 0, in step order."""

import json

import torch.distributed as dist

from asyncflow.metrics import JsonlSink
from asyncflow.pipeline.recorder import StepRecorder

from ._mp import run_ranks


def _record(rank, world, tmp):
    sinks = [JsonlSink(tmp / "metrics.jsonl")] if rank == 0 else []
    stages = ["a", "b"] if rank == 0 else ["c"]
    rec = StepRecorder(stages, dist.new_group(list(range(world))), sinks)
    for step in range(3):
        if rank == 0:
            rec.mean(step, "reward/mean", 1.0, weight=3)  # three rows of reward 1
            rec.stage_done("a", step)
            rec.max(step, "staleness/max", step)
            rec.stage_done("b", step)
        else:
            rec.mean(step, "reward/mean", 0.0)  # one row of reward 0
            rec.total(step, "tokens", 10 * (step + 1))
            rec.max(step, "staleness/max", 5 if step == 1 else 0)
            rec.stage_done("c", step)
    if rank == 0:
        rec.set(3, "eval/accuracy", 0.5)  # a step only rank 0 records, flushed by finish()
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
