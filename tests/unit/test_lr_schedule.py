"""The trainer's LR multiplier: warm-up, then constant or decaying to min_lr_ratio."""

import math

import pytest

from asyncflow.engines.fsdp_engine import OptimConfig, lr_factor


def test_warmup_then_constant():
    f = lr_factor(OptimConfig(warmup_steps=4), total_steps=100)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert f(99) == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_starts_at_one_after_warmup_and_ends_at_min_ratio_on_the_last_step(schedule):
    f = lr_factor(OptimConfig(warmup_steps=10, schedule=schedule, min_lr_ratio=0.1), 110)
    assert f(9) == 1.0 and f(10) == 1.0
    assert f(109) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # never rises
    mid = f(10 + 99 / 2)
    assert mid == pytest.approx(0.55)  # both shapes pass through the midpoint half-way


def test_cosine_and_linear_differ_between_the_ends():
    cos = lr_factor(OptimConfig(warmup_steps=0, schedule="cosine", min_lr_ratio=0.0), 101)
    lin = lr_factor(OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 101)
    assert cos(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lin(25) == pytest.approx(0.75)


def test_bad_schedule_values_are_refused():
    with pytest.raises(ValueError, match="trainer.optim.schedule='step'"):
        OptimConfig(schedule="step")
    with pytest.raises(ValueError, match="min_lr_ratio=1.5"):
        OptimConfig(min_lr_ratio=1.5)
