"""`task=dataset`: JSON Lines, Parquet and save_to_disk directories, nested (verl-style) keys,
chat prompts, and a one-line error naming file, row and column for each kind of bad input."""

import json

import pytest

from asyncflow.tasks import DatasetTask, DatasetTaskConfig, build_task, train_problems

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

VERL_ROWS = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": f"What is {i}+1?"}],
              "reward_model": {"style": "rule", "ground_truth": str(i + 1)}} for i in range(6)]


def _jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _saved(path, rows, num_files=1) -> str:
    """A directory laid out as `datasets.Dataset.save_to_disk` writes it: Arrow stream files,
    dataset_info.json and a state.json listing the files."""
    path.mkdir()
    table = pa.Table.from_pylist(rows)
    names = [f"data-{i:05d}-of-{num_files:05d}.arrow" for i in range(num_files)]
    step = -(-len(rows) // num_files)
    for i, name in enumerate(names):
        with pa.OSFile(str(path / name), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i * step, step))
    (path / "dataset_info.json").write_text(json.dumps({"citation": "", "features": {}}))
    (path / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
        "_output_all_columns": False, "_split": "train"}))
    return str(path)


@pytest.mark.parametrize("write", [_jsonl, _parquet, _saved], ids=["jsonl", "parquet", "saved"])
def test_every_format_reads_the_same_problems_with_nested_keys(tmp_path, write):
    path = write(tmp_path / "d", VERL_ROWS)
    task = DatasetTask(DatasetTaskConfig(path=path, heldout_size=2, chat_template=True,
                                         answer_key="reward_model.ground_truth"))
    held = task.heldout_problems()
    assert [(p.prompt, p.answer) for p in held] == [
        ([{"role": "user", "content": "What is 4+1?"}], "5"),
        ([{"role": "user", "content": "What is 5+1?"}], "6")]
    train = train_problems(task, 0, 4)
    assert sorted(p.answer for p in train) == ["1", "2", "3", "4"]
    assert all(p.chat_template for p in train + held)


def test_a_save_to_disk_directory_of_several_files_is_read_in_order(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(7)]
    task = DatasetTask(DatasetTaskConfig(path=_saved(tmp_path / "d", rows, num_files=3),
                                         heldout_size=3))
    assert [p.answer for p in task.heldout_problems()] == ["4", "5", "6"]


def test_a_real_save_to_disk_directory_is_read_without_the_datasets_package(tmp_path):
    datasets = pytest.importorskip("datasets", reason="needs datasets to write the fixture")
    path = tmp_path / "d"
    datasets.Dataset.from_list(VERL_ROWS).save_to_disk(str(path))
    task = DatasetTask(DatasetTaskConfig(path=str(path), heldout_size=1,
                                         prompt_key="prompt", chat_template=True,
                                         answer_key="reward_model.ground_truth"))
    assert task.heldout_problems()[0].answer == "6"


def test_a_top_level_column_with_a_dot_wins_over_the_nested_path(tmp_path):
    rows = [{"q": q, "a.b": "top", "a": {"b": "nested"}} for q in ("x", "y")]
    task = DatasetTask(DatasetTaskConfig(path=_jsonl(tmp_path / "d.jsonl", rows), heldout_size=1,
                                         prompt_key="q", answer_key="a.b"))
    assert task.heldout_problems()[0].answer == "top"


def test_build_task_builds_the_dataset_task(tmp_path):
    path = _parquet(tmp_path / "d.parquet", [{"prompt": f"q{i}", "answer": "1"} for i in range(3)])
    task = build_task(DatasetTaskConfig(path=path, heldout_size=1))
    assert isinstance(task, DatasetTask) and len(task.heldout_problems()) == 1


@pytest.mark.parametrize("write, rows, where, message", [
    (_jsonl, [{"prompt": "q", "answer": "1"}, "{not json"], r"d:2", r"not valid JSON"),
    (_jsonl, [{"prompt": "q", "answer": "1"}, [1, 2]], r"d:2",
     r"expected a JSON object with string fields \"prompt\" and \"answer\", got array"),
    (_jsonl, [{"prompt": "q"}], r"d:1", r"missing field \"answer\""),
    (_parquet, [{"prompt": "q", "answer": 1}, {"prompt": "r", "answer": 2}], r"d: row 0",
     r"column \"answer\" must be a string, got number 1"),
    (_parquet, [{"prompt": "q", "solution": "1"}], r"d: row 0",
     r"missing column \"answer\" \(columns: prompt, solution\)"),
    (_saved, [{"prompt": "q", "answer": "1"}, {"prompt": "  ", "answer": "1"}],
     r"data-00000-of-00001.arrow: row 1", r"empty prompt"),
    (_saved, [{"prompt": [{"role": "user"}], "answer": "1"}], r"data-00000-of-00001.arrow: row 0",
     r"column \"prompt\": message 0 must be an object with string \"role\" and \"content\""),
], ids=["jsonl-syntax", "jsonl-not-object", "jsonl-missing", "parquet-type", "parquet-missing",
        "saved-blank", "saved-message"])
def test_each_bad_row_is_a_one_line_value_error_naming_file_row_and_column(
        tmp_path, write, rows, where, message):
    path = write(tmp_path / "d", rows)
    with pytest.raises(ValueError, match=rf"^task\.path: \S*{where}: {message}[^\n]*$"):
        DatasetTaskConfig(path=path, heldout_size=1)


def test_bad_files_are_one_line_value_errors_naming_the_file(tmp_path):
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 truncated")
    no_state = tmp_path / "dir"
    no_state.mkdir()
    bad_arrow = tmp_path / "saved"
    _saved(bad_arrow, [{"prompt": "q", "answer": "1"}])
    (bad_arrow / "data-00000-of-00001.arrow").write_bytes(b"garbage")
    cases = [(str(tmp_path / "missing.jsonl"), r"no such file"),
             (str(bad_parquet), r"not a Parquet file pyarrow can read"),
             (str(no_state), r"is a directory without state\.json"),
             (str(bad_arrow), r"not an Arrow stream file")]
    for path, message in cases:
        with pytest.raises(ValueError, match=rf"^task\.path: {tmp_path}/\S*:? {message}[^\n]*$"):
            DatasetTaskConfig(path=path, heldout_size=1)


def test_a_chat_prompt_without_chat_template_is_a_config_error_naming_the_row(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "reward_model": {"ground_truth": "1"}},
                                         VERL_ROWS[0]])
    with pytest.raises(ValueError, match=r"^task\.path: \S*d\.jsonl:2: the prompt is a list of "
                                         r"chat messages, which needs task\.chat_template=true$"):
        DatasetTaskConfig(path=path, heldout_size=1, answer_key="reward_model.ground_truth")
