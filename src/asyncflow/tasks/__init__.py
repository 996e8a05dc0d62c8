"""Verifiable tasks (prompts + rewards) and the tiny default task's prepared model."""

from collections.abc import Callable

from asyncflow.tasks.arithmetic import AdditionConfig, AdditionTask
from asyncflow.tasks.base import (
    Problem,
    Task,
    TaskConfig,
    encode_prompt,
    split_completion,
    train_problems,
)

TASKS: dict[str, tuple[type[TaskConfig], Callable[..., Task]]] = {
    "addition": (AdditionConfig, AdditionTask),
}


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
    "Problem",
    "Task",
    "TaskConfig",
    "build_task",
    "encode_prompt",
    "split_completion",
    "train_problems",
]
