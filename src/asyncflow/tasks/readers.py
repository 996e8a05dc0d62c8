"""Rows of a data task from JSON Lines, Parquet, or a directory written by `datasets.save_to_disk`.

The format is told by the path, not its name: a directory is a `save_to_disk` dataset (its
`state.json` lists the Arrow stream files, read in order with pyarrow, so the heavy `datasets`
package is not needed); a file that starts with Parquet's magic `PAR1` is Parquet (pyarrow); any
other file is JSON Lines (one object per non-blank line, UTF-8).

Columns are mapped as in verl: `prompt_key` and `answer_key` name the prompt and the answer; a
dotted key (`reward_model.ground_truth`) reaches into nested objects when no top-level column has
that exact name. A prompt is a non-blank string or a chat: a non-empty list of objects with
string `role` and `content`. An answer is a string.

Every problem is a one-line ValueError naming the config field, the file, the row and the column,
raised before any work starts: `task.path: data.jsonl:3: ...` (JSON Lines: 1-based line
numbers) or `task.path: train.parquet: row 2: ...` (tables: 0-based row index in that file, as
pyarrow and `datasets` index it). A DatasetDict directory (several splits) names its splits.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

from asyncflow.tasks.base import Messages

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}
_PARQUET_MAGIC = b"PAR1"


class Row(NamedTuple):
    """One row of a data file."""

    prompt: str | Messages
    answer: str
    data: dict[str, Any]
    """The whole row, as read (given to user reward functions)."""
    where: str
    """`task.<field>: <file>:<line>` or `task.<field>: <file>: row <i>`, for error messages."""


def json_type(value: Any) -> str:
    """The JSON name of a value's type (`number`, `null`, ...), for error messages."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def lookup(obj: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(found, value) of `key` in `obj`: the top-level column of that exact name, else the dotted
    path through nested objects."""
    if key in obj:
        return True, obj[key]
    value: Any = obj
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def check_row(obj: Any, where: str, prompt_key: str, answer_key: str, noun: str) -> Row:
    """`obj` as a Row; ValueError at `where` for anything that is not an object with a prompt
    (text or chat) and a string answer. `noun` is what the format calls a key (field, column)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with string fields \"{prompt_key}\" "
                         f"and \"{answer_key}\", got {json_type(obj)}")
    found, prompt = lookup(obj, prompt_key)
    if not found:
        raise ValueError(f"{where}: missing {noun} \"{prompt_key}\"{_columns(obj, noun)}")
    found, answer = lookup(obj, answer_key)
    if not found:
        raise ValueError(f"{where}: missing {noun} \"{answer_key}\"{_columns(obj, noun)}")
    if isinstance(prompt, list):
        if not prompt:
            raise ValueError(f"{where}: empty prompt (an empty list of chat messages)")
        for i, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise ValueError(f"{where}: {noun} \"{prompt_key}\": message {i} must be an "
                                 f"object with string \"role\" and \"content\", got "
                                 f"{json.dumps(message, default=str)[:60]}")
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: {noun} \"{prompt_key}\" must be a string, got "
                         f"{_shown(prompt)} (or a list of chat messages)")
    elif not prompt.strip():
        raise ValueError(f"{where}: empty prompt")
    if not isinstance(answer, str):
        raise ValueError(f"{where}: {noun} \"{answer_key}\" must be a string, got "
                         f"{_shown(answer)}")
    return Row(prompt, answer, obj, where)


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)[:40]
    return json_type(value) if value is None else f"{json_type(value)} {text}"


def _columns(obj: dict[str, Any], noun: str) -> str:
    return f" ({noun}s: {', '.join(map(str, obj))})" if noun == "column" else ""


def read_rows(path: str, field: str, prompt_key: str = "prompt", answer_key: str = "answer"
              ) -> list[Row]:
    """The checked rows of the file or directory `path` (see the module docstring); the errors
    name `task.<field>`. Cached by (path, size, mtime, keys): a config check and the task it
    builds read a file once."""
    file = Path(path)
    if not file.exists():
        raise ValueError(f"task.{field}: {path}: no such file")
    stat = file.stat()
    return list(_read_cached(path, stat.st_size, stat.st_mtime_ns, field, prompt_key, answer_key))


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, size: int, mtime_ns: int, field: str, prompt_key: str,
                 answer_key: str) -> tuple[Row, ...]:
    file = Path(path)
    if file.is_dir():
        rows = _read_saved_dataset(file, field, prompt_key, answer_key)
    else:
        with open(file, "rb") as f:
            magic = f.read(len(_PARQUET_MAGIC))
        if magic == _PARQUET_MAGIC:
            rows = _read_table(_parquet_table(file, field), f"task.{field}: {path}", prompt_key,
                               answer_key)
        else:
            rows = _read_jsonl(file, field, prompt_key, answer_key)
    if not rows:
        raise ValueError(f"task.{field}: {path}: the file is empty; it needs one row per problem "
                         f"with a prompt \"{prompt_key}\" and an answer \"{answer_key}\"")
    return tuple(rows)


def _read_jsonl(file: Path, field: str, prompt_key: str, answer_key: str) -> list[Row]:
    rows = []
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            at = f"task.{field}: {file}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{at}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(check_row(obj, at, prompt_key, answer_key, "field"))
    return rows


def _pyarrow(what: str, field: str):
    try:
        import pyarrow
    except ImportError:
        raise ValueError(f"task.{field}: reading {what} needs pyarrow: pip install "
                         f"'asyncflow[tasks]'") from None
    return pyarrow


def _parquet_table(file: Path, field: str):
    _pyarrow("Parquet", field)
    import pyarrow.parquet as pq

    try:
        return pq.read_table(file)
    except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError, ...) share no base class
        raise ValueError(f"task.{field}: {file}: not a Parquet file pyarrow can read "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         ) from None


def _read_table(table, where: str, prompt_key: str, answer_key: str) -> list[Row]:
    return [check_row(obj, f"{where}: row {i}", prompt_key, answer_key, "column")
            for i, obj in enumerate(table.to_pylist())]


def _read_saved_dataset(directory: Path, field: str, prompt_key: str, answer_key: str
                        ) -> list[Row]:
    """Rows of a `Dataset.save_to_disk` directory: the Arrow stream files its state.json lists."""
    splits_file = directory / "dataset_dict.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text()).get("splits", [])
        first = splits[0] if splits else "train"
        raise ValueError(f"task.{field}: {directory} holds a DatasetDict with splits {splits}; "
                         f"point task.{field} at one split's directory, e.g. "
                         f"{directory / first}")
    state_file = directory / "state.json"
    if not state_file.is_file():
        raise ValueError(f"task.{field}: {directory} is a directory without state.json: not "
                         f"one written by datasets' save_to_disk (give a JSON Lines or Parquet "
                         f"file, or such a directory)")
    try:
        files = [directory / f["filename"] for f in json.loads(state_file.read_text())[
            "_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"task.{field}: {state_file}: not a save_to_disk state.json "
                         f"({type(e).__name__}: {e})") from None
    pa = _pyarrow("a save_to_disk directory", field)
    rows: list[Row] = []
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except Exception as e:  # as in _parquet_table
            raise ValueError(f"task.{field}: {file}: not an Arrow stream file pyarrow can read "
                             f"({type(e).__name__}: {e})") from None
        rows += _read_table(table, f"task.{field}: {file}", prompt_key, answer_key)
    return rows
