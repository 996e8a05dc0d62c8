"""task=reasoning_gym: a seeded train stream that resumes by index, a held-out list disjoint
from it, and reasoning-gym's own scorer on the extracted answer (in the reward worker too)."""

import pytest

from asyncflow.pipeline.reward_worker import RewardItem, RewardWorker
from asyncflow.tasks import ReasoningGymConfig, ReasoningGymTask, build_task, train_problems
from asyncflow.tasks.reasoning_gym import extract_answer

reasoning_gym = pytest.importorskip("reasoning_gym")


def _task(**kw) -> ReasoningGymTask:
    return ReasoningGymTask(ReasoningGymConfig(dataset="basic_arithmetic", heldout_size=16, **kw))


def test_train_problems_are_a_pure_function_of_seed_and_index_and_miss_the_heldout_list():
    task = _task()
    stream = train_problems(task, 0, 64)
    assert [p.uid for p in stream] == list(range(64))
    assert len({p.prompt for p in stream}) > 32  # problems vary
    fresh = _task()
    assert [fresh.train_problem(i) for i in (40, 3, 2000)] == [stream[40], stream[3],
                                                               task.train_problem(2000)]
    held = task.heldout_problems()
    assert len({p.prompt for p in held}) == 16
    assert not {p.prompt for p in held} & {p.prompt for p in stream}
    assert [p.prompt for p in train_problems(_task(seed=1), 0, 8)] != [p.prompt for p in
                                                                       stream[:8]]
    assert [p.prompt for p in _task(seed=1).heldout_problems()] != [p.prompt for p in held]


def test_reward_is_reasoning_gyms_score_of_the_extracted_answer_in_the_worker():
    task = _task()
    p = task.train_problem(5)
    assert p.data["question"] == p.prompt and str(p.data["answer"]) == p.answer
    texts = [f"thinking... <answer>{p.answer}</answer>", f"<answer>{p.answer}1</answer>",
             p.answer, f"<answer>0</answer> <answer>{p.answer}</answer>"]
    with RewardWorker(task, 5.0) as worker:
        out = worker.score([RewardItem(i, t, p.answer, True, p.data) for i, t in enumerate(texts)])
    assert [o.error for o in out] == [None] * 4
    # reasoning-gym's own score (partial credit for a near miss); no tag, no answer; last tag
    scorer = reasoning_gym.create_dataset("basic_arithmetic", seed=0, size=1)
    near = scorer.score_answer(f"{p.answer}1", p.data)
    assert 0.0 < near < 1.0
    assert [o.value for o in out] == [1.0, near, 0.0, 1.0]


def test_task_reward_replaces_the_scorer_with_reward_functions():
    task = ReasoningGymTask(ReasoningGymConfig(dataset="basic_arithmetic", reward=["math", "format"],
                                               reward_weights=[1.0, 0.5], heldout_size=4))
    p = task.train_problem(3)
    right = task.reward(f"so it is \\boxed{{{p.answer}}}", p.answer, True, p.data)
    assert right.total == 1.5 and right.parts == {"math": 1.0, "format": 1.0}
    wrong = task.reward("I think it is 12345678", p.answer, True, p.data)
    assert wrong.total == 0.0 and wrong.parts == {"math": 0.0, "format": 0.0}


def test_answer_formats_extract_the_last_answer():
    assert extract_answer("a <answer> 3 </answer> b <answer>4</answer>", "answer_tag") == "4"
    assert extract_answer("\\boxed{1} then \\boxed{\\frac{1}{2}}", "boxed") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{\\frac{1}{2}", "boxed") is None
    assert extract_answer("  7 ", "raw") == "7"


@pytest.mark.parametrize("kw, message", [
    ({"dataset": "no_such_dataset"}, r"task\.dataset='no_such_dataset' is not a reasoning-gym"),
    ({"params": {"nope": 1}}, r"task\.params\.nope: not a field of reasoning-gym's basic_arithm"),
    ({"answer_format": "xml"}, r"task\.answer_format='xml'; use one of"),
    ({"reward": "no_such_reward"}, r"task\.reward"),
])
def test_config_mistakes_are_value_errors_naming_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        ReasoningGymConfig(**kw)


def test_build_task_builds_it_with_generator_params():
    task = build_task(ReasoningGymConfig(dataset="basic_arithmetic", heldout_size=4,
                                         params={"min_terms": 2, "max_terms": 2}))
    assert isinstance(task, ReasoningGymTask) and len(task.heldout_problems()) == 4


def test_it_composes_from_its_yaml():
    from asyncflow.config import load_config

    cfg = load_config(["task=reasoning_gym", "task.dataset=chain_sum", "+task.params={min_terms: 2}"])
    assert cfg.task == ReasoningGymConfig(dataset="chain_sum", params={"min_terms": 2})
