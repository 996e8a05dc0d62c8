"""Verifiable tasks (prompts + rewards) and the tiny default task's prepared model."""

import dataclasses
from collections.abc import Callable

from asyncflow.tasks.arithmetic import AdditionConfig, AdditionTask
from asyncflow.tasks.base import (
    ChecksTokenizer,
    Messages,
    Problem,
    RewardBreakdown,
    Task,
    TaskConfig,
    encode_problem,
    encode_prompt,
    split_completions,
    train_problems,
)
from asyncflow.tasks.dataset import DatasetTask, DatasetTaskConfig
from asyncflow.tasks.jsonl import JsonlTask, JsonlTaskConfig
from asyncflow.tasks.reasoning_gym import ReasoningGymConfig, ReasoningGymTask

TASKS: dict[str, tuple[type[TaskConfig], Callable[..., Task]]] = {
    "addition": (AdditionConfig, AdditionTask),
    "dataset": (DatasetTaskConfig, DatasetTask),
    "jsonl": (JsonlTaskConfig, JsonlTask),
    "reasoning_gym": (ReasoningGymConfig, ReasoningGymTask),
}


def register_task(kind: str, config_type: type[TaskConfig], factory: Callable[..., Task]) -> None:
    """Make a task defined outside asyncflow selectable as `task=<kind>`.

    Call it before the config is loaded, e.g. in a script that then calls `asyncflow.train.main()`
    under torchrun. `config_type` is a `TaskConfig` dataclass whose `kind` defaults to `kind`;
    `factory(cfg)` builds the task. `task=<kind>` selects the dataclass defaults, overridable
    field by field (`task.<field>=...`); a `conf/task/<kind>.yaml` whose defaults list names
    `<kind>_schema` replaces that, as for the built-in tasks. Task objects are pickled into a
    reward worker process, so define them at module top level of an importable module.
    Raises ValueError for a kind already registered or a `kind` default that differs.
    """
    if kind in TASKS:
        raise ValueError(f"task kind {kind!r} is already registered (by {TASKS[kind][0].__name__}); "
                         f"pick another kind")
    if not (dataclasses.is_dataclass(config_type) and issubclass(config_type, TaskConfig)):
        raise TypeError(f"register_task({kind!r}): config_type {config_type!r} must be a "
                        f"dataclass subclassing TaskConfig")
    default = {f.name: f.default for f in dataclasses.fields(config_type)}["kind"]
    if default != kind:
        raise ValueError(f"register_task({kind!r}): {config_type.__name__}.kind defaults to "
                         f"{default!r}; set its default to {kind!r}")
    TASKS[kind] = (config_type, factory)


def build_task(cfg: TaskConfig) -> Task:
    """Build the task named by `cfg.kind` from its config."""
    if cfg.kind not in TASKS:
        raise ValueError(f"task kind {cfg.kind!r} is unknown; valid kinds: {sorted(TASKS)}")
    config_type, factory = TASKS[cfg.kind]
    if not isinstance(cfg, config_type):
        raise TypeError(
            f"task kind {cfg.kind!r} needs a {config_type.__name__}, got {type(cfg).__name__}"
        )
    return factory(cfg)


__all__ = [
    "TASKS",
    "AdditionConfig",
    "AdditionTask",
    "ChecksTokenizer",
    "DatasetTask",
    "DatasetTaskConfig",
    "JsonlTask",
    "JsonlTaskConfig",
    "Messages",
    "Problem",
    "ReasoningGymConfig",
    "ReasoningGymTask",
    "RewardBreakdown",
    "Task",
    "TaskConfig",
    "build_task",
    "register_task",
    "encode_problem",
    "encode_prompt",
    "split_completions",
    "train_problems",
]
