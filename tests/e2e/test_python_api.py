"""The Python API under real torchrun: a user's script trains on their own data with a reward
function defined in the script itself."""

import json
import os
import subprocess
import sys

from tests.data import addition_jsonl

SCRIPT = '''
import sys
import asyncflow
from asyncflow.tasks import DatasetTaskConfig


def four_chars(completion: str, answer: str, data: dict) -> float:
    """The user's own reward: an answer of the right width (data is the whole record)."""
    return 1.0 if len(completion) == len(data["answer"]) else 0.0


if __name__ == "__main__":
    run_dir = asyncflow.train(
        [f"run.root={sys.argv[1]}", "run.name=api", "pipeline.num_steps=3",
         "pipeline.prompts_per_step=8", "pipeline.eval_every=2", "pipeline.eval_size=16"],
        task=DatasetTaskConfig(path=sys.argv[2], heldout_size=16),
        reward=["exact", four_chars], reward_weights=[1.0, 0.5])
    print("RUN_DIR", run_dir)
'''


def test_a_script_trains_with_its_own_reward_function(tmp_path):
    data = addition_jsonl(tmp_path / "add.jsonl", 200)
    script = tmp_path / "train_mine.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", str(script), str(tmp_path / "runs"), str(data)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [json.loads(x) for x in
             (tmp_path / "runs" / "api" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3]
    for x in lines[:3]:  # each function's own value, beside the weighted sum
        assert 0.0 <= x["reward/exact"] <= 1.0 and 0.0 <= x["reward/four_chars"] <= 1.0
        assert abs(x["reward/mean"] - (x["reward/exact"] + 0.5 * x["reward/four_chars"])) < 1e-5
        assert x["reward/failures"] == 0
    assert "eval/accuracy" in lines[-1]
