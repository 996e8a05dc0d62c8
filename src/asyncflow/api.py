"""The Python API, for users who prefer code to YAML. Run the script under torchrun:

    # train_mine.py
    import asyncflow
    from asyncflow.tasks import DatasetTaskConfig

    def concise(completion: str, answer: str, data: dict) -> float:
        return 1.0 if answer in completion and len(completion) < 400 else 0.0

    if __name__ == "__main__":
        asyncflow.train(["pipeline.num_steps=200", "model.path=/models/qwen"],
                        task=DatasetTaskConfig(path="data/train.jsonl", reward="math"),
                        reward=[concise])

    torchrun --nproc_per_node=2 train_mine.py

Every rank calls `train` with the same arguments. It raises instead of exiting: ConfigError for
a configuration mistake, ValueError for a data or user mistake found while building the run.
A reward given as a function travels to the isolated reward worker by name (`module:function`),
so it must be a top-level function of an importable module; a script run by torchrun is one:
the worker imports it by its file name (its directory is on `sys.path`), which is why the
script's own work must sit under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncflow.config import Config, ConfigError, load_config

__all__ = ["train", "load_config"]

if TYPE_CHECKING:
    from asyncflow.pipeline.stage import StageDecl


def train(config: Config | Sequence[str] | None = None, *, task: Any = None,
          reward: str | Callable | Sequence[str | Callable] | None = None,
          reward_weights: Sequence[float] | None = None,
          config_dir: str | Path | None = None,
          stages: Sequence[StageDecl] = ()) -> Path:
    """Run one RL job on this rank and return its run directory.

    `config`: a Config, or Hydra overrides of the packaged default (`["pipeline.num_steps=50"]`).
    `task`: a task config (e.g. `DatasetTaskConfig(...)`) replacing `config.task`.
    `reward`: a reward spec (`"math"`, `"pkg.mod:fn"`), a top-level function
    `fn(completion, answer, data) -> float`, or a list of them (`reward_weights` weighs them);
    it sets the task's `reward` field, which the task must have (`task=dataset` has).
    `stages`: stages of your own (`StageDecl`, or `map_stage(...)` for a per-batch function),
    run before the train mesh's stages; the queue gains the columns they produce.
    """
    from asyncflow.pipeline.runner import run

    cfg = config if isinstance(config, Config) else load_config(list(config or []), config_dir)
    if task is not None:
        cfg = dataclasses.replace(cfg, task=task)
    if reward is not None:
        specs = [_spec(r) for r in (reward if isinstance(reward, list | tuple) else [reward])]
        if not any(f.name == "reward" for f in dataclasses.fields(cfg.task)):
            raise ConfigError(f"reward=: task kind {cfg.task.kind!r} has no `reward` field; "
                              "use a task that takes one, e.g. DatasetTaskConfig")
        fields = {"reward": specs[0] if len(specs) == 1 else specs}
        if reward_weights is not None:
            fields["reward_weights"] = list(reward_weights)
        try:  # the task config validates its rewards (imports them) on construction
            cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, **fields))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return run(cfg, list(stages))


def _spec(reward: str | Callable) -> str:
    """A reward as the `module:function` name the reward worker imports."""
    if isinstance(reward, str):
        return reward
    module = inspect.getmodule(reward)
    name = getattr(reward, "__qualname__", "")
    if module is None or "." in name or "<" in name:
        raise ConfigError(f"reward {reward!r}: pass a top-level function of an importable module")
    mod = module.__name__
    if mod == "__main__":  # a script run by torchrun: importable under its file's name
        mod = Path(module.__file__ or "").stem
    return f"{mod}:{name}"
