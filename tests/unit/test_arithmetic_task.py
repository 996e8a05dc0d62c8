"""The fixed-width addition task: format, determinism, train/held-out disjointness, exact reward."""

import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncflow.tasks import (
    AdditionConfig,
    AdditionTask,
    TaskConfig,
    build_task,
    encode_prompt,
    split_completions,
    train_problems,
)
from asyncflow.tasks.tiny import build_char_tokenizer

TASK = AdditionTask(AdditionConfig())


def _operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def test_prompts_and_answers_are_fixed_width_and_correct():
    problems = TASK.heldout_problems() + train_problems(TASK, 0, 2000)
    for p in problems:
        assert re.fullmatch(r"\d{3}\+\d{3}=", p.prompt), p.prompt
        assert re.fullmatch(r"\d{4}", p.answer), p.answer
        a, b = _operands(p.prompt)
        assert int(p.answer) == a + b


@given(st.integers(0, 999), st.integers(0, 999))
def test_problem_pads_operands_to_three_and_sum_to_four_digits(a, b):
    p = TASK.problem(7, a, b)
    assert p.prompt == f"{a:03d}+{b:03d}=" and p.answer == f"{a + b:04d}" and p.uid == 7


def test_operand_digit_counts_are_uniform_before_heldout_rejection():
    task = AdditionTask(AdditionConfig(heldout_size=1))  # rejection negligible
    operands = [x for p in train_problems(task, 0, 6000) for x in _operands(p.prompt)]
    counts = Counter(len(str(x)) for x in operands)
    for k in (1, 2, 3):
        assert abs(counts[k] / 12000 - 1 / 3) < 0.02, counts


def test_heldout_is_fixed_size_distinct_and_deterministic_from_seed():
    heldout = TASK.heldout_problems()
    assert len(heldout) == 512 == len({p.prompt for p in heldout})
    assert [p.uid for p in heldout] == list(range(512))
    assert AdditionTask(AdditionConfig(seed=0)).heldout_problems() == heldout
    other = AdditionTask(AdditionConfig(seed=1)).heldout_problems()
    assert {p.prompt for p in other} != {p.prompt for p in heldout}


def test_train_stream_is_a_function_of_seed_and_index_so_a_cursor_resumes():
    sequential = train_problems(TASK, 0, 300)
    fresh = AdditionTask(AdditionConfig())
    picks = (299, 17, 150)
    assert [fresh.train_problem(i) for i in picks] == [sequential[i] for i in picks]
    assert train_problems(fresh, 100, 50) == sequential[100:150]
    assert [p.uid for p in sequential] == list(range(300))
    other = train_problems(AdditionTask(AdditionConfig(seed=1)), 0, 300)
    assert [p.prompt for p in other] != [p.prompt for p in sequential]
    with pytest.raises(ValueError, match="-1"):
        TASK.train_problem(-1)


def test_train_stream_never_yields_a_heldout_pair():
    heldout = {p.prompt for p in TASK.heldout_problems()}
    train = train_problems(TASK, 0, 20000)
    assert not heldout & {p.prompt for p in train}
    assert not any(TASK.is_heldout(p) for p in train)
    assert all(TASK.is_heldout(p) for p in TASK.heldout_problems())


def test_disjointness_holds_where_collisions_would_be_frequent():
    # One digit: 100 pairs, a quarter of them held out; an unfiltered stream would hit them often.
    task = AdditionTask(AdditionConfig(num_digits=1, heldout_size=25))
    heldout = {p.prompt for p in task.heldout_problems()}
    train = {p.prompt for p in train_problems(task, 0, 3000)}
    assert len(heldout) == 25 and not heldout & train
    assert len(train) == 75  # every other pair still appears


@pytest.mark.parametrize("completion, finished, want", [
    ("0959", True, 1.0),
    ("0959", False, 0.0),  # ran out of tokens before EOS
    ("959", True, 0.0),  # unpadded
    ("0958", True, 0.0),
    ("09590", True, 0.0),
    (" 0959", True, 0.0),
    ("0959 ", True, 0.0),
    ("0959<pad>", True, 0.0),
    ("", True, 0.0),
])
def test_reward_is_exact_match_with_eos(completion, finished, want):
    assert TASK.reward(completion, "0959", finished) == want


def test_split_completions_cut_at_first_eos_and_keep_stray_specials():
    tok = build_char_tokenizer()
    eos, pad = tok.eos_id, tok.pad_id
    stray = tok.encode("09") + [pad] + tok.encode("59") + [eos]
    got = split_completions(tok, [tok.encode("0959") + [eos, 4, eos], tok.encode("09590"), stray,
                                  [eos], []], [eos])
    assert got == [("0959", True), ("09590", False), ("09<pad>59", True), ("", True),
                   ("", False)]
    assert TASK.reward(got[2][0], "0959", got[2][1]) == 0.0
    assert encode_prompt(tok, "042+917=") == [tok.bos_id] + tok.encode("042+917=")


def test_build_task_dispatches_on_kind_and_names_valid_kinds():
    assert isinstance(build_task(AdditionConfig(seed=3)), AdditionTask)
    with pytest.raises(ValueError, match=r"'sorting'.*\['addition', 'dataset', 'jsonl', "
                                         r"'reasoning_gym'\]"):
        build_task(TaskConfig(kind="sorting"))
    with pytest.raises(TypeError, match="AdditionConfig"):
        build_task(TaskConfig(kind="addition"))


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_digits=0), "num_digits=0"),
    (dict(num_digits=1, heldout_size=512), "heldout_size=512"),
    (dict(heldout_size=0), "heldout_size=0"),
])
def test_addition_config_rejects_bad_values_naming_them(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdditionConfig(**kwargs)
