"""Other placements run end to end: 2 rollout + 2 train ranks (FSDP2 over 2), and colocated."""

import json

import pytest

from .conftest import torchrun

STEPS = 3


@pytest.mark.parametrize("nproc, placement, extra", [
    (4, "split_2x2", []),
    (2, "colocated", []),
    (2, "split", ["weight_sync.kind=disk", "queue.transport=dist", "algorithm.kl_coef=0.01",
                  "algorithm=dr_grpo"]),
    (2, "split", ["trainer.micro_batch_size=128"]),  # a step (64 rows) smaller than a chunk
])
def test_placement_runs(tmp_path, nproc, placement, extra):
    out = torchrun(nproc, [f"run.root={tmp_path}", "run.name=p", f"placement={placement}",
                           f"pipeline.num_steps={STEPS}", "pipeline.eval_every=2",
                           "pipeline.prompts_per_step=8", "pipeline.eval_size=64", *extra],
                   timeout_s=300)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(STEPS + 1))
    assert [x["policy_version"] for x in lines[:STEPS]] == [1, 2, 3]
    assert all(x["reward/failures"] == 0 and x["rollout/errors"] == 0 for x in lines[:STEPS])
    assert lines[-1]["eval/policy_version"] == STEPS
    if "algorithm.kl_coef=0.01" in extra:
        assert all("loss/kl" in x for x in lines[:STEPS])
