"""Checkpoints shared by the rollout-engine tests (saved once per session)."""

import pytest

from tests.engines import LLAMA, TINY, save_random


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return save_random(tmp_path_factory, "qwen2", TINY, 0)


@pytest.fixture(scope="session")
def tiny_b(tmp_path_factory):
    """Same shape as `tiny`, other weights: the policy after an update."""
    return save_random(tmp_path_factory, "qwen2b", TINY, 1)


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    return save_random(tmp_path_factory, "llama", LLAMA, 2)
