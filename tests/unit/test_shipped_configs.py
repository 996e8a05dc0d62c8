"""Every config the package ships composes and validates: each option of each group on top of
the default, and each experiment recipe."""

import pytest

from asyncflow.config import CONF_DIR, load_config
from tests.data import addition_jsonl

OPTIONS = sorted((d.name, f.stem) for d in CONF_DIR.iterdir() if d.is_dir()
                 for f in d.glob("*.yaml"))


@pytest.mark.parametrize("group, name", OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_a_shipped_config_composes(group, name, tmp_path):
    if group == "experiment":  # recipes are added to the default, not chosen in its defaults
        cfg = load_config([f"+experiment={name}"])
    elif group == "task" and name in ("dataset", "jsonl"):  # they read the user's file
        data = addition_jsonl(tmp_path / "add.jsonl", 300)
        cfg = load_config([f"task={name}", f"task.path={data}"])
    else:
        cfg = load_config([f"{group}={name}"])
    assert cfg.pipeline.num_steps >= 1


def test_the_smollm2_recipe_is_the_real_model_on_math():
    cfg = load_config(["+experiment=smollm2_math"])
    assert cfg.model.pretrained == "smollm2-135m-instruct" and cfg.task.kind == "reasoning_gym"
    assert cfg.task.reward == "math" and cfg.task.chat_template
