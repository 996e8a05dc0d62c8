"""Configuration mistakes: one line naming the field, exit code 2, before any work starts."""

import subprocess
import sys

import pytest

from .conftest import REPO, torchrun


@pytest.mark.parametrize("override, message", [
    ("pipeline.max_staleness=-1", "pipeline.max_staleness=-1 must be >= 0"),
    ("trainer.optim.lr=0", "trainer.optim.lr=0.0 must be > 0"),
    ("trainer.optim.lr=fast", "trainer.optim.lr=fast"),
    ("pipeline.prompts_per_step=0", "pipeline.prompts_per_step=0 must be >= 1"),
    ("no_such_key=1", "no_such_key is not a config key"),
    ("placement=nowhere", "Could not find 'placement/nowhere'"),
    ("algorithm.aggregation=mean", "algorithm.aggregation='mean'"),
    ("trainer.micro_batch_size=60", "micro_batch_size=60 must be a multiple of"),
    ("pipeline.group_size=1", "pipeline.group_size=1 must be >= 2"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0 must be >= 1"),
    ("model.path=/no/such/model", "model.path='/no/such/model' does not exist"),
    ("checkpoint.every=-1", "checkpoint.every=-1 must be >= 0"),
    ("trainer.optim.max_nonfinite_steps=0", "max_nonfinite_steps=0 must be >= 1"),
    ("rollout.top_p=1.5", "rollout.top_p=1.5 must be in (0, 1]"),
    ("rollout.top_k=-1", "rollout.top_k=-1 must be >= 0"),
    ("run.name=../../x", "run.name='../../x' must be one directory name under run.root"),
    ("run.name=a/b", "run.name='a/b' must be one directory name under run.root"),
    ("model.pretrained=gpt5", "model.pretrained='gpt5'; use one of ['smollm2-135m-instruct']"),
    ("algorithm.overlong_buffer=9", "algorithm.overlong_buffer=9 must be <= rollout.max_new_tok"),
])
def test_bad_override_is_one_line_and_exit_2(override, message):
    _assert_one_line_and_exit_2([override], message)


def _assert_one_line_and_exit_2(overrides: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "asyncflow.train", *overrides], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert lines[0].startswith("asyncflow: config error: "), out.stderr


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "1+1=", "answer": "02"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
    ("", "bad.jsonl: the file is empty"),
    ('{"prompt": "1+1=", "answer": 2}\n', 'bad.jsonl:1: field "answer" must be a string'),
    ('{"prompt": "1+1=", "answer": "02"}\n\n{"prompt": "", "answer": "2"}\n',
     "bad.jsonl:3: empty prompt"),
    ('{"answer": "2"}\n', 'bad.jsonl:1: missing field "prompt"'),
    ("[1, 2]\n", "bad.jsonl:1: expected a JSON object"),
])
def test_malformed_jsonl_file_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    _assert_one_line_and_exit_2(["task=jsonl", f"task.path={path}"], f"task.path: {tmp_path}/{message}")


def test_missing_jsonl_file_or_path_is_one_line(tmp_path):
    _assert_one_line_and_exit_2(["task=jsonl", f"task.path={tmp_path}/none.jsonl"],
                                f"task.path: {tmp_path}/none.jsonl: no such file")
    _assert_one_line_and_exit_2(["task=jsonl"], "missing mandatory value: path")


def test_placement_that_does_not_match_world_size(tmp_path):
    out = torchrun(2, ["placement=split_2x2", f"run.root={tmp_path}"], timeout_s=120)
    assert out.returncode != 0
    assert "must cover ranks 0..1 exactly (torchrun world size 2)" in out.stderr, out.stderr[-3000:]
