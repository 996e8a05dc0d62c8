"""A task from the user's own data: JSON Lines of `{"prompt": ..., "answer": ...}`.

Each non-blank line of `task.path` is a JSON object with string fields `prompt` (not blank) and
`answer`; other fields are ignored. The files are read and checked when the config is built, so a
malformed line is a one-line config error naming the field, the file and the line, before any work
starts.

Held-out rows are the lines of `heldout_path`, or else the last `heldout_size` lines of `path`.
Train rows are the other lines of `path`, less any whose prompt is also a held-out prompt, so no
held-out prompt is ever trained on. The train stream walks the train rows epoch after epoch, each
epoch in its own order shuffled by (seed, epoch): problem `index` is a pure function of
(seed, index), so a data cursor resumes by remembering the next index.

Rewards: `exact` is 1.0 iff the completion equals the answer (both stripped) and EOS was
generated; `numeric` is 1.0 iff the last number in the completion equals the answer as a number
(`0959` = `959`, `1.50` = `1.5`, `1,000` = `1000`; EOS not needed), and needs every answer to be a
number.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

from asyncflow.tasks.base import Problem, TaskConfig, encode_prompt

JSONL_REWARDS = ("exact", "numeric")
"""Valid `JsonlTaskConfig.reward` values."""

_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


@dataclass(kw_only=True)
class JsonlTaskConfig(TaskConfig):
    """Prompts and reference answers read from JSON Lines files."""

    kind: str = "jsonl"
    """Task kind; always `jsonl` for this config."""
    path: str
    """JSON Lines file of train rows (and of held-out rows when `heldout_path` is None)."""
    heldout_path: str | None = None
    """JSON Lines file of held-out rows; None = the last `heldout_size` rows of `path`."""
    heldout_size: int = 128
    """Rows held out from the end of `path` when `heldout_path` is None (unused otherwise)."""
    reward: str = "exact"
    """`exact` (stripped completion == answer, and EOS) or `numeric` (last number == answer)."""

    def __post_init__(self):
        super().__post_init__()
        if self.reward not in JSONL_REWARDS:
            raise ValueError(f"task.reward={self.reward!r}; use one of {list(JSONL_REWARDS)}")
        if self.heldout_path is None and self.heldout_size < 1:
            raise ValueError(f"task.heldout_size={self.heldout_size} must be >= 1 (rows held out "
                             f"from the end of task.path), or set task.heldout_path")
        split_rows(self)  # reads and checks the files


class Row(NamedTuple):
    """One line of a JSONL file."""

    prompt: str
    answer: str
    line: int
    """1-based line number, for error messages."""


def read_rows(path: str, field: str) -> list[Row]:
    """The rows of a JSONL file; ValueError naming `task.<field>`, the file and the line for
    anything that is not a JSON object with string `prompt` (not blank) and `answer`."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"task.{field}: {path}: no such file")
    rows = []
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            at = f"task.{field}: {path}:{number}"
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
            if not isinstance(obj, dict):
                raise ValueError(f"{at}: expected a JSON object with string fields \"prompt\" and "
                                 f"\"answer\", got {_json_type(obj)}")
            for key in ("prompt", "answer"):
                if key not in obj:
                    raise ValueError(f"{at}: missing field \"{key}\"")
                if not isinstance(obj[key], str):
                    raise ValueError(f"{at}: field \"{key}\" must be a string, got "
                                     f"{_json_type(obj[key])} {json.dumps(obj[key])[:40]}")
            if not obj["prompt"].strip():
                raise ValueError(f"{at}: empty prompt")
            rows.append(Row(obj["prompt"], obj["answer"], number))
    if not rows:
        raise ValueError(f"task.{field}: {path}: the file is empty; it needs one JSON object per "
                         f"line with string fields \"prompt\" and \"answer\"")
    return rows


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def split_rows(cfg: JsonlTaskConfig) -> tuple[list[Row], list[Row]]:
    """(train rows, held-out rows) of the config's files, checked; see the module docstring."""
    rows = read_rows(cfg.path, "path")
    if cfg.heldout_path is not None:
        train, heldout = rows, read_rows(cfg.heldout_path, "heldout_path")
    else:
        if cfg.heldout_size >= len(rows):
            raise ValueError(f"task.heldout_size={cfg.heldout_size} leaves no train rows in "
                             f"{cfg.path} ({len(rows)} rows); lower it or set task.heldout_path")
        train, heldout = rows[:-cfg.heldout_size], rows[-cfg.heldout_size:]
    if cfg.reward == "numeric":
        for source, part in _sources(cfg, train, heldout):
            for row in part:
                if not _NUMBER.fullmatch(row.answer.strip()):
                    raise ValueError(f"{source}:{row.line}: answer {row.answer!r:.40} is not a "
                                     f"number, which task.reward=numeric needs")
    held_prompts = {row.prompt for row in heldout}
    train = [row for row in train if row.prompt not in held_prompts]
    if not train:
        raise ValueError(f"task.path: {cfg.path}: every train prompt is also a held-out prompt; "
                         f"held-out prompts are never trained on")
    return train, heldout


def _sources(cfg: JsonlTaskConfig, train: list[Row], heldout: list[Row]
             ) -> list[tuple[str, list[Row]]]:
    """Train and held-out rows, each with `task.<field>: <file>` for error messages."""
    held = (f"task.heldout_path: {cfg.heldout_path}" if cfg.heldout_path is not None
            else f"task.path: {cfg.path}")
    return [(f"task.path: {cfg.path}", train), (held, heldout)]


@functools.lru_cache(maxsize=4)  # the reward stage may still look up the previous epoch
def epoch_order(seed: int, num_rows: int, epoch: int) -> tuple[int, ...]:
    """The order in which epoch `epoch` visits the train rows."""
    order = list(range(num_rows))
    random.Random(f"jsonl-train:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def _last_number(text: str) -> Decimal | None:
    found = _NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "")) if found else None


class JsonlTask:
    """`Task` implementation for `JsonlTaskConfig`."""

    def __init__(self, cfg: JsonlTaskConfig):
        self.cfg = cfg
        self.train_rows, self.heldout_rows = split_rows(cfg)

    def train_problem(self, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"train index {index} must be >= 0")
        epoch, pos = divmod(index, len(self.train_rows))
        row = self.train_rows[epoch_order(self.cfg.seed, len(self.train_rows), epoch)[pos]]
        return Problem(index, row.prompt, row.answer)

    def heldout_problems(self) -> list[Problem]:
        return [Problem(i, row.prompt, row.answer) for i, row in enumerate(self.heldout_rows)]

    def reward(self, completion: str, answer: str, finished: bool) -> float:
        if self.cfg.reward == "exact":
            return 1.0 if finished and completion.strip() == answer.strip() else 0.0
        number = _last_number(completion)
        return 1.0 if number is not None and number == Decimal(answer.strip().replace(",", "")) \
            else 0.0

    def check_tokenizer(self, tokenizer, max_prompt_tokens: int) -> None:
        """ValueError naming the file and line of the first prompt or answer the tokenizer cannot
        encode (it would silently drop or replace characters) or prompt longer than
        `max_prompt_tokens` (special tokens included)."""
        for source, rows in _sources(self.cfg, self.train_rows, self.heldout_rows):
            for row in rows:
                for key, text in (("prompt", row.prompt), ("answer", row.answer)):
                    if tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) != text:
                        lost = sorted({c for c in text if tokenizer.decode(
                            tokenizer.encode(c), skip_special_tokens=False) != c})
                        raise ValueError(
                            f"{source}:{row.line}: the model's tokenizer cannot "
                            f"encode the {key} {text!r:.60} (characters {''.join(lost)!r}); "
                            f"use a model whose tokenizer covers the data")
                num_tokens = len(encode_prompt(tokenizer, row.prompt))
                if num_tokens > max_prompt_tokens:
                    raise ValueError(
                        f"{source}:{row.line}: the prompt is {num_tokens} tokens; "
                        f"the model takes at most {max_prompt_tokens} (its context less "
                        f"rollout.max_new_tokens)")
