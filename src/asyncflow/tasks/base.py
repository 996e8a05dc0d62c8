"""The `Task` seam: prompts for a split, and an exact reward for a completion.

Tasks deal in text and metadata only; tokenisation belongs to the caller. Two helpers fix the
contract at the token boundary so every caller builds prompts and reads completions the same way:

- `encode_prompt` tokenises a prompt with the tokenizer's own special-token template (`<bos>` for
  the tiny tokenizer, nothing for Qwen-style tokenizers), as `transformers` does by default.
- `split_completion` turns generated ids into `(completion, finished)`: the text decoded from the
  ids before the first EOS (special tokens kept, so a stray `<pad>` can never look like a digit)
  and whether an EOS was generated at all. `Task.reward` takes exactly that pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class TaskConfig:
    """Common base of task configs; `build_task` picks the implementation by `kind`."""

    kind: str = "addition"
    """Which task to build; see `asyncflow.tasks.TASKS` for the valid kinds."""
    seed: int = 0
    """Fixes the held-out list and the train stream."""
    reward_timeout_s: float = 10.0
    """Seconds one reward call may take; past it the row fails and its reward worker restarts."""
    on_reward_failure: str = "zero"
    """A failed row's fate: `zero` (reward 0.0) or `drop_group` (its whole group gets advantage 0,
    so it carries no gradient)."""

    def __post_init__(self):
        if not 0 < self.reward_timeout_s < math.inf:
            raise ValueError(f"task.reward_timeout_s={self.reward_timeout_s} must be a finite "
                             f"number of seconds > 0")
        if self.on_reward_failure not in ON_REWARD_FAILURE:
            raise ValueError(f"task.on_reward_failure={self.on_reward_failure!r}; use one of "
                             f"{list(ON_REWARD_FAILURE)}")


ON_REWARD_FAILURE = ("zero", "drop_group")
"""Valid `TaskConfig.on_reward_failure` values."""


@dataclass
class Problem:
    """One prompt with the metadata its reward needs."""

    uid: int
    """Position in its split (train: stream index; held-out: list index); unique within a split."""
    prompt: str
    """Text given to the model, without special tokens."""
    answer: str
    """Reference answer the reward compares the completion against."""


class Task(Protocol):
    """A verifiable task: a train stream, a fixed held-out list and a reward."""

    def train_problem(self, index: int) -> Problem:
        """Problem `index` of the endless train stream: a pure function of (task seed, index), so a
        data cursor resumes by remembering the next index."""
        ...

    def heldout_problems(self) -> list[Problem]:
        """The fixed held-out list; disjoint from every problem of the train stream."""
        ...

    def reward(self, completion: str, answer: str, finished: bool) -> float:
        """Score a completion as returned by `split_completion` against `Problem.answer`. Runs
        in a reward worker process, and may run more than once for a row (the rows scored just
        before another row's timeout or crash are scored again): a function of its arguments."""
        ...


def train_problems(task: Task, start: int, count: int) -> list[Problem]:
    """Problems `start .. start + count - 1` of the train stream."""
    return [task.train_problem(i) for i in range(start, start + count)]


class Encoder(Protocol):
    """What tasks need of a tokenizer (`asyncflow.models.Tokenizer` and HF tokenizers fit)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@runtime_checkable
class ChecksTokenizer(Protocol):
    """A task whose data can be checked against the model's tokenizer before a run starts."""

    def check_tokenizer(self, tokenizer: Encoder, max_prompt_tokens: int) -> None:
        """Raise ValueError naming the offending row if the tokenizer cannot encode some prompt
        or answer, or a prompt is longer than `max_prompt_tokens` (special tokens included)."""
        ...


def encode_prompt(tokenizer: Encoder, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's special-token template applied (e.g. a leading `<bos>`)."""
    return list(tokenizer.encode(prompt, add_special_tokens=True))


def split_completion(
    tokenizer: Encoder, response_ids: Sequence[int], eos_ids: Sequence[int]
) -> tuple[str, bool]:
    """(text before the first EOS with special tokens kept, whether an EOS was generated)."""
    ids, eos = list(response_ids), set(eos_ids)
    stop = next((i for i, t in enumerate(ids) if t in eos), None)
    if stop is not None:
        return tokenizer.decode(ids[:stop], skip_special_tokens=False), True
    return tokenizer.decode(ids, skip_special_tokens=False), False
