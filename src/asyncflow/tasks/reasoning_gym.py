"""Procedural tasks from reasoning-gym: `task=reasoning_gym task.dataset=<name>`.

reasoning-gym's generators make endless problems with checkable answers (`basic_arithmetic`,
`chain_sum`, `gsm_symbolic`, `countdown`, `sudoku`, ... ; `task.params` sets the generator's own
config fields: `+task.params={min_terms: 2, max_terms: 3}` on the command line, the `+` because
the keys are new to Hydra). The prompt is the entry's
`question` (render it with the chat template and a `task.system_prompt` that asks for the answer
in the form `task.answer_format` extracts); the reward is the dataset's own `score_answer`
(which may give partial credit), on the answer extracted from the completion: the last
`<answer>...</answer>` (`answer_tag`, reasoning-gym's convention), the last `\\boxed{...}`
(`boxed`), or the whole completion (`raw`). No answer found scores as reasoning-gym scores None.

Seeding. reasoning-gym builds entry `i` of a dataset created with seed `s` from
`Random(s + i)` (and, for a few generators, draws a per-dataset plan from `Random(s)` sized by
the dataset's size). Problems therefore come in chunks of CHUNK entries, each chunk a dataset of
size CHUNK whose seed is a hash of (task seed, split, redraw, chunk number) below 2**31 (some
generators seed numpy, which takes 32 bits): train problem `index` is entry `index % CHUNK` of
chunk `index // CHUNK`, a pure function of (seed, index), so a data cursor resumes by remembering
the next index. The held-out list is the first `heldout_size` distinct questions of its own
chunk seeds. Seed ranges of different chunks can still overlap (and small problem spaces repeat
anyway), so disjointness is enforced on the question text: a train problem whose question is a
held-out question is redrawn from another chunk family, up to MAX_REDRAWS times.

reasoning-gym is imported only when this task is configured (`pip install 'asyncflow[tasks]'`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

from asyncflow.tasks.base import Problem, RewardBreakdown, TaskConfig
from asyncflow.tasks.rewards import RewardFunctions

CHUNK = 1024
"""Entries per generated dataset chunk."""
MAX_REDRAWS = 64
"""Draws a train problem gets to miss the held-out questions before the task gives up."""
HELDOUT_DRAWS = 8
"""The held-out list is drawn from at most this many times `heldout_size` entries."""
ANSWER_FORMATS = ("answer_tag", "boxed", "raw")
"""Valid `ReasoningGymConfig.answer_format` values."""

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _registry() -> dict[str, tuple[type, type]]:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise ValueError("task=reasoning_gym needs reasoning-gym: pip install "
                         "'asyncflow[tasks]'") from None
    return DATASETS


@dataclass
class ReasoningGymConfig(TaskConfig):
    """Problems and scores from one of reasoning-gym's procedural datasets."""

    kind: str = "reasoning_gym"
    """Task kind; always `reasoning_gym` for this config."""
    dataset: str = "basic_arithmetic"
    """reasoning-gym dataset name (`reasoning_gym.factory.DATASETS`), e.g. chain_sum."""
    params: dict[str, Any] = field(default_factory=dict)
    """The dataset's own config fields (not seed or size), e.g. {min_terms: 2}."""
    heldout_size: int = 128
    """Distinct questions in the fixed held-out list."""
    answer_format: str = "answer_tag"
    """Where the answer is read from the completion: `answer_tag` (last <answer>...</answer>),
    `boxed` (last \\boxed{...}) or `raw` (the whole completion, stripped)."""
    reward: Any = "dataset"
    """`dataset`: reasoning-gym's own `score_answer` on the answer `answer_format` extracts.
    Otherwise reward functions as for `task=dataset` (`math`, `[math,format]`, `pkg.mod:fn`;
    see `asyncflow.tasks.rewards`), given the entry as `data`."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per `reward` function; empty = 1.0 each."""

    def __post_init__(self):
        super().__post_init__()
        datasets = _registry()
        if self.dataset not in datasets:
            raise ValueError(f"task.dataset={self.dataset!r} is not a reasoning-gym dataset; "
                             f"use one of {sorted(datasets)}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"task.answer_format={self.answer_format!r}; use one of "
                             f"{list(ANSWER_FORMATS)}")
        if self.heldout_size < 1:
            raise ValueError(f"task.heldout_size={self.heldout_size} must be >= 1")
        allowed = {f.name for f in fields(datasets[self.dataset][1])} - {"seed", "size"}
        for key in self.params:
            if key not in allowed:
                raise ValueError(f"task.params.{key}: not a field of reasoning-gym's "
                                 f"{self.dataset} config; use some of {sorted(allowed)}")
        make_dataset(self.dataset, params_key(self.params), 0, 1)  # validates the params
        if self.reward != "dataset":
            RewardFunctions(self.reward, self.reward_weights)  # checks names and imports


def params_key(params: dict[str, Any]) -> str:
    """`params` as a cache key (JSON: config values are plain data)."""
    return json.dumps(params, sort_keys=True)


@functools.lru_cache(maxsize=8)  # a chunk serves CHUNK consecutive train problems
def make_dataset(name: str, params: str, seed: int, size: int):
    """reasoning-gym's dataset `name` with the JSON `params`, `seed` and `size`; ValueError
    naming `task.params` when reasoning-gym refuses them."""
    dataset_cls, config_cls = _registry()[name]
    kwargs = json.loads(params)
    try:
        config = config_cls(**kwargs, seed=seed, size=size)
        if hasattr(config, "validate"):
            config.validate()
        return dataset_cls(config=config)
    except (AssertionError, ValueError, TypeError) as e:  # reasoning-gym validates with asserts
        raise ValueError(f"task.params={kwargs}: reasoning-gym's {name} refuses them "
                         f"({type(e).__name__}: {e})") from None


def chunk_seed(seed: int, split: str, redraw: int, chunk: int) -> int:
    """The dataset seed of a chunk: a hash below 2**31 (numpy seeds take 32 bits)."""
    digest = hashlib.sha256(f"reasoning-gym:{seed}:{split}:{redraw}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def extract_answer(completion: str, answer_format: str) -> str | None:
    """The answer in the completion as `answer_format` reads it (module docstring), or None."""
    if answer_format == "raw":
        return completion.strip()
    if answer_format == "answer_tag":
        found = _ANSWER_TAG.findall(completion)
        return found[-1].strip() if found else None
    start = completion.rfind("\\boxed")
    brace = completion.find("{", start) if start >= 0 else -1
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(completion)):
        depth += {"{": 1, "}": -1}.get(completion[i], 0)
        if depth == 0:
            return completion[brace + 1:i].strip()
    return None  # unbalanced: cut off before its closing brace


class ReasoningGymTask:
    """`Task` implementation for `ReasoningGymConfig`. Problems carry their reasoning-gym entry
    (question, answer, metadata) as `Problem.data`, which `score_answer` reads."""

    def __init__(self, cfg: ReasoningGymConfig):
        self.cfg = cfg
        self._params = params_key(cfg.params)
        heldout: dict[str, dict] = {}  # question -> entry, in draw order
        draws = HELDOUT_DRAWS * cfg.heldout_size
        for i in range(draws):
            entry = self._entry("heldout", 0, i)
            heldout.setdefault(entry["question"], entry)
            if len(heldout) == cfg.heldout_size:
                break
        else:
            raise ValueError(f"task.heldout_size={cfg.heldout_size}: reasoning-gym's "
                             f"{cfg.dataset} gave only {len(heldout)} distinct questions in "
                             f"{draws} draws; lower task.heldout_size")
        self._heldout = list(heldout.values())
        self._held = frozenset(heldout)
        self._scorer = None
        self.rewards = (None if cfg.reward == "dataset"
                        else RewardFunctions(cfg.reward, cfg.reward_weights))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_scorer": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # in a reward worker: import reasoning-gym while the worker starts, not in a row's time
        self.__dict__.update(state)
        self._scorer = make_dataset(self.cfg.dataset, self._params, 0, 1)

    def _entry(self, split: str, redraw: int, index: int) -> dict[str, Any]:
        chunk, pos = divmod(index, CHUNK)
        dataset = make_dataset(self.cfg.dataset, self._params,
                               chunk_seed(self.cfg.seed, split, redraw, chunk), CHUNK)
        return dataset[pos]

    def _problem(self, uid: int, entry: dict[str, Any]) -> Problem:
        answer = entry.get("answer")
        return Problem(uid, entry["question"], "" if answer is None else str(answer), data=entry,
                       chat_template=self.cfg.chat_template,
                       system_prompt=self.cfg.system_prompt)

    def train_problem(self, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"train index {index} must be >= 0")
        for redraw in range(MAX_REDRAWS):
            entry = self._entry("train", redraw, index)
            if entry["question"] not in self._held:
                return self._problem(index, entry)
        raise ValueError(f"task.dataset={self.cfg.dataset!r}: {MAX_REDRAWS} draws for train "
                         f"problem {index} were all held-out questions; the dataset has few "
                         f"distinct problems: lower task.heldout_size")

    def heldout_problems(self) -> list[Problem]:
        return [self._problem(i, entry) for i, entry in enumerate(self._heldout)]

    def reward(self, completion: str, answer: str, finished: bool,
               data: dict[str, Any] | None = None) -> float | RewardBreakdown:
        """reasoning-gym's `score_answer` of the extracted answer against the entry `data`, or
        `task.reward`'s functions."""
        if data is None:
            raise ValueError("reasoning_gym rewards need the problem's entry (Problem.data)")
        if self.rewards is not None:
            return self.rewards(completion, answer, finished, data)
        if self._scorer is None:
            self._scorer = make_dataset(self.cfg.dataset, self._params, 0, 1)
        return self._scorer.score_answer(extract_answer(completion, self.cfg.answer_format), data)
