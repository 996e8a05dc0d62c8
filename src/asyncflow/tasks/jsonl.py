"""`task=jsonl`: the data task under its first name (`asyncflow.tasks.dataset`).

It reads what `task=dataset` reads (JSON Lines, Parquet, save_to_disk directories) with the same
checks, streams and rewards; only its kind differs, so existing configs and runs keep working.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncflow.tasks.dataset import DatasetTask, DatasetTaskConfig


@dataclass(kw_only=True)
class JsonlTaskConfig(DatasetTaskConfig):
    """Prompts and reference answers read from a file: `DatasetTaskConfig` as `task=jsonl`."""

    kind: str = "jsonl"
    """Task kind; always `jsonl` for this config."""


JsonlTask = DatasetTask
"""The task `JsonlTaskConfig` builds."""
