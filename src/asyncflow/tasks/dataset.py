"""A task from the user's own data: prompts and reference answers read from a file.

`task=dataset task.path=...` reads JSON Lines, Parquet or a `datasets.save_to_disk` directory
(`asyncflow.tasks.readers`), with the prompt and answer columns named by `task.prompt_key` and
`task.answer_key` (dotted keys reach nested objects). A prompt is text or a list of chat
messages; how it is rendered is the task's `chat_template`/`system_prompt` (see
`asyncflow.tasks.base.encode_prompt`). The files are read and checked when the config is built,
so a malformed row is a one-line config error naming the field, the file, the row and the column,
before any work starts. `task=jsonl` is the same task under its older name.

Held-out rows are the rows of `heldout_path`, or else the last `heldout_size` rows of `path`.
Train rows are the other rows of `path`, less any whose prompt is also a held-out prompt, so no
held-out prompt is ever trained on. The train stream walks the train rows epoch after epoch, each
epoch in its own order shuffled by (seed, epoch): problem `index` is a pure function of
(seed, index), so a data cursor resumes by remembering the next index.

Rewards are `task.reward` (`asyncflow.tasks.rewards`): built-in `exact`, `numeric`, `math`,
`format`, or the user's `module:function`, or a weighted list of them. `numeric` needs every
answer to be a number, checked with the files. When a user function is configured, problems
carry their record (`Problem.data`) and the reward hands it to the function as `data`.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from typing import Any

from asyncflow.tasks.base import Problem, RewardBreakdown, TaskConfig, encode_problem
from asyncflow.tasks.readers import Row, read_rows
from asyncflow.tasks.rewards import NUMBER, RewardFunctions


@dataclass(kw_only=True)
class DatasetTaskConfig(TaskConfig):
    """Prompts and reference answers read from JSON Lines, Parquet or save_to_disk data."""

    kind: str = "dataset"
    """Task kind; always `dataset` for this config."""
    path: str
    """Train rows (and held-out rows when `heldout_path` is None): a JSON Lines or Parquet file,
    or a directory written by `datasets.save_to_disk`."""
    heldout_path: str | None = None
    """Held-out rows, in any format `path` takes; None = the last `heldout_size` rows of `path`."""
    heldout_size: int = 128
    """Rows held out from the end of `path` when `heldout_path` is None (unused otherwise)."""
    prompt_key: str = "prompt"
    """Column of the prompt (text or chat messages); `a.b` reaches into nested objects."""
    answer_key: str = "answer"
    """Column of the reference answer (a string); `a.b` reaches into nested objects."""
    reward: Any = "exact"
    """A reward name (`exact`, `numeric`, `math`, `format`), `module:function`, or a list of
    them (`[math,format]`); see `asyncflow.tasks.rewards`."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per `reward` function; empty = 1.0 each."""

    def __post_init__(self):
        super().__post_init__()
        # kept as given (a name or a list): OmegaConf's `Any` field takes both, and the
        # config's YAML round trip keeps the user's spelling
        RewardFunctions(self.reward, self.reward_weights)  # checks names and imports
        if self.heldout_path is None and self.heldout_size < 1:
            raise ValueError(f"task.heldout_size={self.heldout_size} must be >= 1 (rows held out "
                             f"from the end of task.path), or set task.heldout_path")
        for name in ("prompt_key", "answer_key"):
            if not getattr(self, name):
                raise ValueError(f"task.{name}={getattr(self, name)!r} must name a column")
        split_rows(self)  # reads and checks the files


def _prompt_id(prompt: str | list) -> str:
    """A hashable identity of a prompt (text or chat), for held-out disjointness."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def split_rows(cfg: DatasetTaskConfig) -> tuple[list[Row], list[Row]]:
    """(train rows, held-out rows) of the config's files, checked; see the module docstring."""
    rows = read_rows(cfg.path, "path", cfg.prompt_key, cfg.answer_key)
    if cfg.heldout_path is not None:
        train = rows
        heldout = read_rows(cfg.heldout_path, "heldout_path", cfg.prompt_key, cfg.answer_key)
    else:
        if cfg.heldout_size >= len(rows):
            raise ValueError(f"task.heldout_size={cfg.heldout_size} leaves no train rows in "
                             f"{cfg.path} ({len(rows)} rows); lower it or set task.heldout_path")
        train, heldout = rows[:-cfg.heldout_size], rows[-cfg.heldout_size:]
    specs = [cfg.reward] if isinstance(cfg.reward, str) else list(cfg.reward)
    if "numeric" in specs:
        for row in train + heldout:
            if not NUMBER.fullmatch(row.answer.strip()):
                raise ValueError(f"{row.where}: answer {row.answer!r:.40} is not a number, which "
                                 f"task.reward=numeric needs")
    if not cfg.chat_template:
        for row in train + heldout:
            if not isinstance(row.prompt, str):
                raise ValueError(f"{row.where}: the prompt is a list of chat messages, which "
                                 f"needs task.chat_template=true")
    held_prompts = {_prompt_id(row.prompt) for row in heldout}
    train = [row for row in train if _prompt_id(row.prompt) not in held_prompts]
    if not train:
        raise ValueError(f"task.path: {cfg.path}: every train prompt is also a held-out prompt; "
                         f"held-out prompts are never trained on")
    return train, heldout


@functools.lru_cache(maxsize=4)  # the reward stage may still look up the previous epoch
def epoch_order(seed: int, num_rows: int, epoch: int) -> tuple[int, ...]:
    """The order in which epoch `epoch` visits the train rows."""
    order = list(range(num_rows))
    # the key keeps its first task's name: streams stay what runs of `task=jsonl` trained on
    random.Random(f"jsonl-train:{seed}:{epoch}").shuffle(order)
    return tuple(order)


class DatasetTask:
    """`Task` implementation for `DatasetTaskConfig`."""

    def __init__(self, cfg: DatasetTaskConfig):
        self.cfg = cfg
        self.train_rows, self.heldout_rows = split_rows(cfg)
        self.rewards = RewardFunctions(cfg.reward, cfg.reward_weights)

    def _problem(self, uid: int, row: Row) -> Problem:
        return Problem(uid, row.prompt, row.answer,
                       data=row.data if self.rewards.reads_data else None,
                       chat_template=self.cfg.chat_template, system_prompt=self.cfg.system_prompt)

    def train_problem(self, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"train index {index} must be >= 0")
        epoch, pos = divmod(index, len(self.train_rows))
        return self._problem(
            index, self.train_rows[epoch_order(self.cfg.seed, len(self.train_rows), epoch)[pos]])

    def heldout_problems(self) -> list[Problem]:
        return [self._problem(i, row) for i, row in enumerate(self.heldout_rows)]

    def reward(self, completion: str, answer: str, finished: bool,
               data: dict[str, Any] | None = None) -> float | RewardBreakdown:
        """`task.reward` of the completion; `data` is the problem's record (None = an empty one)."""
        return self.rewards(completion, answer, finished, {} if data is None else data)

    def check_tokenizer(self, tokenizer, max_prompt_tokens: int) -> None:
        """ValueError naming the file and row of the first prompt or answer the tokenizer cannot
        encode (it would silently drop or replace characters), or whose prompt, as the model
        sees it (chat template included), is longer than `max_prompt_tokens`."""
        for row in self.train_rows + self.heldout_rows:
            texts = [("prompt", row.prompt)] if isinstance(row.prompt, str) else \
                [(f"message {i}", m["content"]) for i, m in enumerate(row.prompt)]
            for key, text in texts + [("answer", row.answer)]:
                if tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) != text:
                    lost = sorted({c for c in text if tokenizer.decode(
                        tokenizer.encode(c), skip_special_tokens=False) != c})
                    raise ValueError(
                        f"{row.where}: the model's tokenizer cannot encode the {key} "
                        f"{text!r:.60} (characters {''.join(lost)!r}); use a model whose "
                        f"tokenizer covers the data")
            try:
                num_tokens = len(encode_problem(tokenizer, self._problem(0, row)))
            except ValueError as e:  # no chat template, or the template refuses this chat
                raise ValueError(f"{row.where}: {e}") from None
            if num_tokens > max_prompt_tokens:
                raise ValueError(
                    f"{row.where}: the prompt is {num_tokens} tokens; the model takes at most "
                    f"{max_prompt_tokens} (its context less rollout.max_new_tokens)")
