"""A reward that hangs, raises, or returns NaN or a string costs rows, never the run: a real
torchrun of a task registered from a user's script, not from asyncflow's own code."""

import json
import re

from .conftest import torchrun

STEPS = 4


def test_faulty_rewards_are_counted_logged_and_survived(tmp_path):
    out = torchrun(2, [f"run.root={tmp_path}", "run.name=f", "task=faulty_addition",
                       "task.reward_timeout_s=0.5", f"pipeline.num_steps={STEPS}",
                       "pipeline.prompts_per_step=8", "pipeline.eval_every=2",
                       "pipeline.eval_size=32"],
                   timeout_s=180, module="tests.e2e.faulty_run")
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "f"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(STEPS + 1))
    assert [x["policy_version"] for x in lines[:STEPS]] == [1, 2, 3, 4]
    assert any(x["reward/failures"] > 0 for x in lines[:STEPS])
    assert any(x["reward/timeouts"] > 0 for x in lines[:STEPS])
    assert all(x["reward/timeouts"] <= x["reward/failures"] for x in lines[:STEPS])
    assert sum(x["reward/failures"] for x in lines[:STEPS]) % 8 == 0  # whole groups: same answer
    assert any(x.get("eval/reward_failures", 0) > 0 for x in lines)
    log = "".join(p.read_text() for p in (run / "logs").glob("rank*.log"))
    reasons = set(re.findall(r"reward: row \d+ \(problem \d+\) failed: (\w+)", log))
    assert {"timeout", "RuntimeError", "returned"} <= reasons, reasons
