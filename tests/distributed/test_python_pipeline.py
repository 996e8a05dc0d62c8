"""A pipeline built and run in-process from Python on forked gloo ranks, with a stage of the
user's own (declared, not wired into the runner) and a reward function of their own."""

import json

import torch

from tests.data import addition_jsonl
from tests.distributed._mp import run_ranks

STEPS = 3


def response_lengths(columns, metrics):
    """The user's stage: each row's response length, as a new column and as a metric."""
    lengths = columns["response_ids"].lengths
    metrics.mean("lengths/response_mean", lengths.double().mean().item(), len(lengths))
    return {"response_len": lengths.to(torch.int64)}


def _train(rank, world_size, root, data):
    import asyncflow
    from asyncflow.tasks import DatasetTaskConfig
    from tests.user_rewards import contains_answer

    lengths = asyncflow.map_stage("lengths", "rollout", ["response_ids"], response_lengths,
                                  [asyncflow.ColumnSpec("response_len", "int64", [])])
    run_dir = asyncflow.train(
        [f"run.root={root}", "run.name=inproc", f"pipeline.num_steps={STEPS}",
         "pipeline.prompts_per_step=8", "pipeline.eval_every=2", "pipeline.eval_size=16",
         "run.timeout_s=60"],
        task=DatasetTaskConfig(path=data, heldout_size=16),
        reward=["exact", contains_answer], reward_weights=[1.0, 0.5], stages=[lengths])
    return str(run_dir)


def test_a_pipeline_with_a_custom_stage_and_reward_runs_in_process(tmp_path):
    data = addition_jsonl(tmp_path / "add.jsonl", 100)
    out = run_ranks(_train, 2, timeout_s=240, root=str(tmp_path), data=str(data))
    assert out[0] == out[1] == str(tmp_path / "inproc")
    lines = [json.loads(x) for x in (tmp_path / "inproc" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(STEPS + 1))
    for x in lines[:STEPS]:
        # the custom stage saw every row of the step: its mean length is rollout's
        assert abs(x["lengths/response_mean"] - x["response/length_mean"]) < 1e-9, x
        assert x["time/lengths_s"] > 0
        assert 0.0 <= x["reward/contains_answer"] <= 1.0 and x["reward/failures"] == 0
        assert abs(x["reward/mean"] - (x["reward/exact"] + 0.5 * x["reward/contains_answer"])) \
            < 1e-5
    assert "eval/accuracy" in lines[-1]
    # what the held-out answers were, beside their mean: 8 per evaluation (steps 0, 2 and 3)
    samples = [json.loads(x) for x in
               (tmp_path / "inproc" / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0] * 8 + [2] * 8 + [3] * 8
    # exact + 0.5 * contains_answer: right, containing the answer, or neither
    assert all(isinstance(s["completion"], str) and s["reward"] in (0.0, 0.5, 1.5) for s in samples)
