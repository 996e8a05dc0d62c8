"""`task=jsonl` end to end: a user's file of addition problems trains like the built-in task, and
a row the model's tokenizer cannot encode stops the run before any work, naming its line."""

import json

from asyncflow.tasks import AdditionConfig, AdditionTask

from .conftest import torchrun

STEPS = 3


def _write(path, problems) -> str:
    path.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n"
                            for p in problems))
    return str(path)


def test_jsonl_file_of_addition_problems_trains(tmp_path):
    task = AdditionTask(AdditionConfig())
    train = _write(tmp_path / "train.jsonl", [task.train_problem(i) for i in range(200)])
    test = _write(tmp_path / "test.jsonl", task.heldout_problems()[:32])
    out = torchrun(2, [f"run.root={tmp_path}", "run.name=j", "task=jsonl", f"task.path={train}",
                       f"task.heldout_path={test}", f"pipeline.num_steps={STEPS}",
                       "pipeline.prompts_per_step=8", "pipeline.eval_every=2"], timeout_s=180)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [json.loads(x) for x in (tmp_path / "j" / "metrics.jsonl").read_text().splitlines()]
    assert [x["policy_version"] for x in lines[:STEPS]] == [1, 2, 3]
    assert all(x["reward/failures"] == 0 for x in lines[:STEPS])
    assert 0 < lines[0]["eval/accuracy"] < 1  # the warm-started tiny model knows some sums


def test_a_prompt_the_tokenizer_cannot_encode_stops_the_run_naming_its_line(tmp_path):
    task = AdditionTask(AdditionConfig())
    path = tmp_path / "words.jsonl"
    _write(path, [task.train_problem(i) for i in range(20)])
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "one plus two=", "answer": "0003"}) + "\n")
    out = torchrun(2, [f"run.root={tmp_path}", "task=jsonl", f"task.path={path}",
                       "task.heldout_size=4"], timeout_s=120)
    assert out.returncode != 0
    assert (f"asyncflow: error: task.path: {path}:21: the model's tokenizer cannot encode the "
            f"prompt 'one plus two='") in out.stderr, out.stderr[-3000:]
