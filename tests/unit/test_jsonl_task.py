"""The JSONL task: checked input (file and line in every error), a resumable shuffled train
stream disjoint from the held-out rows, the exact and numeric rewards, tokenizer coverage."""

import json
from collections import Counter

import pytest

from asyncflow.tasks import JsonlTask, JsonlTaskConfig, build_task, train_problems
from asyncflow.tasks.tiny import build_char_tokenizer


def _write(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _addition_rows(n: int) -> list[dict]:
    return [{"prompt": f"{i:03d}+{i + 1:03d}=", "answer": f"{2 * i + 1:04d}", "id": i}
            for i in range(n)]


def _task(tmp_path, n=20, heldout_size=4, **kw) -> JsonlTask:
    path = _write(tmp_path / "d.jsonl", _addition_rows(n))
    return JsonlTask(JsonlTaskConfig(path=path, heldout_size=heldout_size, **kw))


def test_train_stream_is_a_shuffled_epoch_walk_that_resumes_by_index(tmp_path):
    task = _task(tmp_path, n=20, heldout_size=4)
    stream = train_problems(task, 0, 48)  # 16 train rows: three epochs
    assert [p.uid for p in stream] == list(range(48))
    epochs = [[p.prompt for p in stream[i:i + 16]] for i in (0, 16, 32)]
    assert all(sorted(e) == sorted(r["prompt"] for r in _addition_rows(16)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # each epoch has its own order
    assert epochs[0] != sorted(epochs[0])
    fresh = _task(tmp_path, n=20, heldout_size=4)
    assert [fresh.train_problem(i) for i in (37, 5, 20)] == [stream[37], stream[5], stream[20]]
    other_seed = _task(tmp_path, n=20, heldout_size=4, seed=1)
    assert [p.prompt for p in train_problems(other_seed, 0, 16)] != epochs[0]


def test_heldout_rows_never_appear_in_the_train_stream(tmp_path):
    task = _task(tmp_path, n=20, heldout_size=4)
    held = task.heldout_problems()
    assert [p.uid for p in held] == [0, 1, 2, 3]
    assert [p.prompt for p in held] == [r["prompt"] for r in _addition_rows(20)[-4:]]
    assert not {p.prompt for p in held} & {p.prompt for p in train_problems(task, 0, 64)}


def test_a_train_row_with_a_heldout_prompt_is_left_out(tmp_path):
    rows = _addition_rows(6)
    train = _write(tmp_path / "train.jsonl", rows)
    test = _write(tmp_path / "test.jsonl", [rows[2], {"prompt": "999+000=", "answer": "0999"}])
    task = JsonlTask(JsonlTaskConfig(path=train, heldout_path=test))
    assert len(task.heldout_problems()) == 2
    counts = Counter(p.prompt for p in train_problems(task, 0, 50))
    assert set(counts) == {r["prompt"] for r in rows} - {rows[2]["prompt"]}
    assert set(counts.values()) == {10}  # five rows, ten epochs


def test_exact_reward_needs_the_stripped_answer_and_eos(tmp_path):
    task = _task(tmp_path)
    assert task.reward("0959", "0959", True) == 1.0
    assert task.reward(" 0959 ", "0959", True) == 1.0
    assert task.reward("0959", "0959", False) == 0.0
    assert task.reward("959", "0959", True) == 0.0


def test_numeric_reward_compares_the_last_number(tmp_path):
    task = _task(tmp_path, reward="numeric")
    assert task.reward("959", "0959", False) == 1.0
    assert task.reward("so 3 + 4 = 7, answer: 1,000.50", "1000.5", True) == 1.0
    assert task.reward("959 or 960", "0959", True) == 0.0
    assert task.reward("no number", "0959", True) == 0.0
    assert task.reward("-3", "-3.0", True) == 1.0


def test_build_task_builds_the_jsonl_task(tmp_path):
    cfg = JsonlTaskConfig(path=_write(tmp_path / "d.jsonl", _addition_rows(3)), heldout_size=1)
    assert isinstance(build_task(cfg), JsonlTask)


@pytest.mark.parametrize("lines, line, message", [
    (['{"prompt": "1+1=", "answer": "2"}', '{"prompt": "1+1=", "answer": "2"'], 2,
     "not valid JSON (Expecting ',' delimiter at column 33)"),
    (['{"prompt": "1+1=", "answer": "2"}', "", '[1, 2]'], 3,
     'expected a JSON object with string fields "prompt" and "answer", got array'),
    (['"1+1="'], 1, 'expected a JSON object with string fields "prompt" and "answer", got string'),
    (['{"prompt": "1+1=", "answer": "2"}', '{"question": "1+1=", "answer": "2"}'], 2,
     'missing field "prompt"'),
    (['{"prompt": "1+1="}'], 1, 'missing field "answer"'),
    (['{"prompt": "1+1=", "answer": 2}'], 1, 'field "answer" must be a string, got number 2'),
    (['{"prompt": null, "answer": "2"}'], 1, 'field "prompt" must be a string, got null'),
    (['{"prompt": "1+1=", "answer": "2"}', '{"prompt": "  ", "answer": "2"}'], 2,
     "empty prompt"),
])
def test_each_malformed_line_is_a_value_error_naming_file_and_line(tmp_path, lines, line,
                                                                    message):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as e:
        JsonlTaskConfig(path=path, heldout_size=1)
    assert f"task.path: {path}:{line}: {message}" in str(e.value)
    assert "\n" not in str(e.value)


def test_file_level_mistakes_name_the_field_and_file(tmp_path):
    good = _write(tmp_path / "good.jsonl", _addition_rows(3))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    cases = [
        (dict(path=str(tmp_path / "nope.jsonl")), f"task.path: {tmp_path}/nope.jsonl: no such file"),
        (dict(path=str(tmp_path / "empty.jsonl")), "empty.jsonl: the file is empty"),
        (dict(path=str(tmp_path / "latin1.jsonl")), "latin1.jsonl:1: not UTF-8"),
        (dict(path=good, heldout_path=str(tmp_path / "nope.jsonl")),
         "task.heldout_path: "),
        (dict(path=good, heldout_size=3), "task.heldout_size=3 leaves no train rows"),
        (dict(path=good, heldout_size=0), "task.heldout_size=0 must be >= 1"),
        (dict(path=good, heldout_path=good), "every train prompt is also a held-out prompt"),
        (dict(path=good, heldout_size=1, reward="fuzzy"), "task.reward='fuzzy'"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            JsonlTaskConfig(**kw)


def test_numeric_reward_needs_numeric_answers(tmp_path):
    rows = _addition_rows(3) + [{"prompt": "a", "answer": "two"}]
    path = _write(tmp_path / "d.jsonl", rows)
    JsonlTaskConfig(path=path, heldout_size=1)  # exact: any answer
    with pytest.raises(ValueError, match=r"d\.jsonl:4: answer 'two' is not a number"):
        JsonlTaskConfig(path=path, heldout_size=1, reward="numeric")


def test_text_the_tiny_tokenizer_cannot_encode_is_named_by_line(tmp_path):
    tok = build_char_tokenizer()
    _task(tmp_path, n=5, heldout_size=1).check_tokenizer(tok, max_prompt_tokens=16)
    rows = _addition_rows(3) + [{"prompt": "what is 1+1?", "answer": "2"}]
    path = _write(tmp_path / "words.jsonl", rows)
    task = JsonlTask(JsonlTaskConfig(path=path, heldout_size=1))
    with pytest.raises(ValueError, match=r"words\.jsonl:4: the model's tokenizer cannot encode "
                                         r"the prompt 'what is 1\+1\?' \(characters '\?ahistw'\)"):
        task.check_tokenizer(tok, max_prompt_tokens=16)
    with pytest.raises(ValueError, match=r"d\.jsonl:1: the prompt is 9 tokens; the model "
                                         r"takes at most 8"):
        _task(tmp_path, n=5, heldout_size=1).check_tokenizer(tok, max_prompt_tokens=8)
