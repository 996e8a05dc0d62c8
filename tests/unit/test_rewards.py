"""Data-task rewards: the built-ins (math through math-verify), the user's `module:function`
alone or weighted in a list with per-function parts, and user faults inside the reward worker."""

import json
import math

import pytest

from asyncflow.pipeline.reward_worker import RewardItem, RewardWorker
from asyncflow.tasks import DatasetTask, DatasetTaskConfig, RewardBreakdown
from asyncflow.tasks.rewards import RewardFunctions, format_reward

TIMEOUT_S = 0.5


def _math(completion: str, answer: str) -> float:
    pytest.importorskip("math_verify")
    return RewardFunctions("math", [])(completion, answer, True, {})


@pytest.mark.parametrize("completion, answer, expected", [
    ("So the result is \\boxed{42}.", "42", 1.0),
    ("First 3/4, then \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("The answer is 1/2", "0.5", 1.0),
    ("x = 2, so \\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
    ("\\boxed{43}", "42", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("I computed \\boxed{42} but then \\boxed{41}", "42", 0.0),
    ("", "42", 0.0),
    ("}}\\boxed{{{ %$# \\frac{", "42", 0.0),
    ("no answer here at all", "42", 0.0),
    # a numeric answer left as arithmetic is not an answer (a policy learned to restate the
    # question, "7 - 5 = ?", and was paid for it before this rule)
    ("7 - 5 = ?", "2", 0.0),
    ("\\boxed{7-5}", "2", 0.0),
    ("so 7 - 5 = 2.", "2", 1.0),
    # a division written out in any form, or a fraction not in lowest terms, restates the
    # question (14 / 7 = ?): only a number's own forms count
    ("\\boxed{14/7}", "2", 0.0),
    ("\\boxed{\\frac{14}{7}}", "2", 0.0),
    ("\\boxed{\\dfrac{2}{4}}", "0.5", 0.0),
    ("\\boxed{14 \\div 7}", "2", 0.0),
    ("\\boxed{(14)/(7)}", "2", 0.0),
    ("so 7/2", "3.5", 1.0),
    ("\\boxed{2\\frac{1}{2}}", "2.5", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{3+2\\sqrt{2}}", "2\\sqrt{2}+3", 1.0),
], ids=["boxed", "frac-vs-decimal", "decimal-vs-frac", "final-answer", "expression", "wrong",
        "wrong-frac", "last-boxed", "empty", "garbage", "no-number", "restated-question",
        "boxed-arithmetic", "restated-division", "restated-division-frac", "unreduced",
        "restated-div-sign", "restated-parens", "reduced-ratio", "mixed-number", "thousands",
        "worked-out", "negative", "symbolic-sum"])
def test_math_reward_checks_the_boxed_or_final_answer_for_equivalence(completion, answer,
                                                                       expected):
    assert _math(completion, answer) == expected


def test_format_bonus_needs_a_marked_answer_and_eos():
    assert format_reward("so \\boxed{3}", "", True, {}) == 1.0
    assert format_reward("<answer> 3 </answer>", "", True, {}) == 1.0
    assert format_reward("so \\boxed{3}", "", False, {}) == 0.0
    assert format_reward("the answer is 3", "", True, {}) == 0.0


def test_a_weighted_list_is_the_weighted_sum_with_one_part_per_function():
    rewards = RewardFunctions(["numeric", "format", "tests.user_rewards:contains_answer"],
                              [1.0, 0.2, 0.5])
    out = rewards("it is \\boxed{7}", "7", True, {})
    assert isinstance(out, RewardBreakdown)
    assert out.parts == {"numeric": 1.0, "format": 1.0, "contains_answer": 1.0}
    assert out.total == pytest.approx(1.7)
    assert RewardFunctions("numeric", [2.0])("7", "7", False, {}) == 2.0


@pytest.mark.parametrize("reward, weights, message", [
    ("nope", [], r"task\.reward='nope' is neither a built-in reward"),
    ("tests.no_such_module:fn", [], r"module 'tests\.no_such_module' does not import"),
    ("tests.user_rewards:missing", [], r"has no function 'missing'"),
    ("tests.user_rewards:takes_two", [], r"must take \(completion, answer, data\)"),
    (["exact", "numeric"], [1.0], r"has 1 weights for 2 reward functions"),
    (["exact", "exact"], [], r"the part name 'exact' is taken"),
])
def test_reward_config_mistakes_are_value_errors_naming_the_field(reward, weights, message):
    with pytest.raises(ValueError, match=message):
        RewardFunctions(reward, weights)


def _user_task(tmp_path, reward, weights=()) -> DatasetTask:
    rows = [{"prompt": f"q{i}", "answer": "ab", "meta": {"length": 2}} for i in range(3)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DatasetTask(DatasetTaskConfig(path=str(path), heldout_size=1, reward=reward,
                                         reward_weights=list(weights)))


def test_a_user_reward_gets_the_whole_record_in_the_reward_worker(tmp_path):
    task = _user_task(tmp_path, "tests.user_rewards:length_match")
    problem = task.train_problem(0)
    assert problem.data == {"prompt": problem.prompt, "answer": "ab", "meta": {"length": 2}}
    items = [RewardItem(i, text, problem.answer, True, problem.data)
             for i, text in enumerate(["xy", "xyz"])]
    with RewardWorker(task, TIMEOUT_S) as worker:
        out = worker.score(items)
    assert [(o.value, o.error, o.parts) for o in out] == [(1.0, None, None), (0.0, None, None)]


def test_a_user_reward_that_raises_hangs_or_returns_nan_fails_only_its_row(tmp_path):
    task = _user_task(tmp_path, ["tests.user_rewards:contains_answer", "tests.user_rewards:faulty"],
                      [1.0, 2.0])
    data = task.train_problem(0).data
    texts = ["ab", "raise", "ab", "hang", "nan", "string", "x"]
    with RewardWorker(task, TIMEOUT_S) as worker:
        out = worker.score([RewardItem(i, t, "ab", True, data) for i, t in enumerate(texts)])
    assert [o.value for o in out] == [2.0, None, 2.0, None, None, None, 1.0]
    assert out[0].parts == {"contains_answer": 1.0, "faulty": 0.5}
    assert out[1].error == "RuntimeError: sandbox died"
    assert out[3].error == "timeout after 0.5 s" and out[3].timed_out
    assert out[4].error == "ValueError: reward function tests.user_rewards:faulty returned nan, " \
                           "not a finite number"
    assert out[5].error.startswith("TypeError: reward function tests.user_rewards:faulty "
                                   "returned str")
    assert all(o.parts is None for o in out if o.value is None)
    assert not math.isnan(sum(o.value for o in out if o.value is not None))
