"""Task config checks, and tasks registered from outside asyncflow selected by `task=<kind>`."""

from dataclasses import dataclass

import pytest

from asyncflow.config import ConfigError, load_config
from asyncflow.tasks import (
    TASKS,
    AdditionConfig,
    AdditionTask,
    JsonlTaskConfig,
    TaskConfig,
    register_task,
)


@pytest.mark.parametrize("field, value, message", [
    ("reward_timeout_s", 0.0, "task.reward_timeout_s=0.0 must be a finite number of seconds > 0"),
    ("reward_timeout_s", float("inf"), "task.reward_timeout_s=inf must be"),
    ("reward_timeout_s", float("nan"), "task.reward_timeout_s=nan must be"),
    ("on_reward_failure", "skip", "task.on_reward_failure='skip'; use one of ['zero', 'drop_group']"),
])
def test_reward_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AdditionConfig(**{field: value})


def test_reward_settings_compose_from_the_command_line():
    cfg = load_config(["task.reward_timeout_s=2.5", "task.on_reward_failure=drop_group"])
    assert cfg.task.reward_timeout_s == 2.5 and cfg.task.on_reward_failure == "drop_group"
    with pytest.raises(ConfigError, match="task.on_reward_failure='skip'"):
        load_config(["task.on_reward_failure=skip"])


@dataclass
class _DoubleConfig(TaskConfig):
    """Addition with a different kind, as a library user would define it."""

    kind: str = "test_double"
    """Task kind."""
    heldout_size: int = 16
    """Held-out pairs."""


def _build_double(cfg: _DoubleConfig) -> AdditionTask:
    return AdditionTask(AdditionConfig(seed=cfg.seed, heldout_size=cfg.heldout_size))


def test_a_registered_task_without_yaml_is_selected_by_its_kind():
    register_task("test_double", _DoubleConfig, _build_double)
    try:
        cfg = load_config(["task=test_double", "task.heldout_size=8"])
        assert cfg.task == _DoubleConfig(heldout_size=8)
        with pytest.raises(ValueError, match="'test_double' is already registered"):
            register_task("test_double", _DoubleConfig, _build_double)
    finally:
        del TASKS["test_double"]


def test_register_task_refuses_a_kind_its_config_does_not_default_to():
    with pytest.raises(ValueError, match="_DoubleConfig.kind defaults to 'test_double'"):
        register_task("other", _DoubleConfig, _build_double)
    with pytest.raises(TypeError, match="must be a dataclass subclassing TaskConfig"):
        register_task("plain", dict, _build_double)
    with pytest.raises(ValueError, match="'addition' is already registered"):
        register_task("addition", AdditionConfig, AdditionTask)
    assert "other" not in TASKS and "plain" not in TASKS


def test_the_jsonl_task_composes_from_its_yaml(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "1+2=", "answer": "3"}\n')
    cfg = load_config(["task=jsonl", f"task.path={path}", "task.heldout_size=1",
                       "task.reward=numeric"])
    assert cfg.task == JsonlTaskConfig(path=str(path), heldout_size=1, reward="numeric")


def test_a_full_or_read_only_disk_is_one_line_naming_the_file():
    import errno

    from asyncflow.train import storage_error

    line = storage_error(OSError(errno.ENOSPC, "No space left on device", "/runs/r/metrics.jsonl"))
    assert line == ("asyncflow: error: no space left on the device writing /runs/r/metrics.jsonl; "
                    "free space or point run.root (and the cache, ASYNCFLOW_CACHE) at a writable "
                    "disk")
    assert "read-only file system" in storage_error(OSError(errno.EROFS, "ro", "/x"))
    assert storage_error(OSError(errno.EIO, "I/O error")) is None  # not the user's to fix


def test_the_dataset_task_composes_with_nested_keys_weighted_rewards_and_a_chat_template(
        tmp_path):
    from asyncflow.tasks import DatasetTaskConfig

    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "1+1=", "gt": {"a": "2"}}\n{"q": "1+2=", "gt": {"a": "3"}}\n')
    cfg = load_config(["task=dataset", f"task.path={path}", "task.heldout_size=1",
                       "task.prompt_key=q", "task.answer_key=gt.a", "task.chat_template=true",
                       "task.system_prompt=Be brief.", "task.reward=[numeric,format]",
                       "task.reward_weights=[1.0,0.2]"])
    assert cfg.task == DatasetTaskConfig(
        path=str(path), heldout_size=1, prompt_key="q", answer_key="gt.a", chat_template=True,
        system_prompt="Be brief.", reward=["numeric", "format"], reward_weights=[1.0, 0.2])
