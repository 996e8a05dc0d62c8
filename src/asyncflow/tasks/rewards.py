"""Reward functions for data tasks: built-in ones by name, the user's own by `module:function`.

`task.reward` names one function or a list of them (`task.reward=[math,my_pkg.rewards:fmt]`,
weighted by `task.reward_weights=[1.0,0.2]`; no weights = 1.0 each):

- `exact`: 1.0 iff EOS was generated and the completion equals the answer (both stripped).
- `numeric`: 1.0 iff the last number in the completion equals the answer as a number (`0959` =
  `959`, `1.50` = `1.5`, `1,000` = `1000`; EOS not needed).
- `math`: math-verify. The answer is parsed as LaTeX (`$answer$`, or as is when it holds a
  `\\boxed{}`); from the completion the last `\\boxed{...}` is taken first, else an answer after
  an anchor ("the answer is"), else the last number or expression; 1.0 iff math-verify finds the
  two equivalent (`\\frac{1}{2}` = `0.5` = `1/2`). When the answer is a number, the completion's
  must be written as one too (an integer, a decimal, or a fraction in lowest terms): arithmetic
  left undone (`7 - 5`, `14/7` or `14 \\div 7` for 2, which math-verify would accept) scores 0.
  EOS not needed.
- `format`: 1.0 iff EOS was generated and the completion marks a final answer, as `\\boxed{...}`
  or `<answer>...</answer>`; a bonus to weight in beside a correctness reward.
- `pkg.module:function`: the user's `function(completion: str, answer: str, data: dict)
  -> float`, `data` being the whole dataset record (prompt and answer columns included). The function
  is imported when the config is built (a typo fails there, naming the field) and again in each
  reward worker; it must be a top-level function of an importable module.

One function: its weighted value is the row's reward. Several: the reward is the weighted sum,
and each function's own (unweighted) value is reported as a part named after it (the built-in
name, or the function's name), which the reward stage logs as `reward/<name>`.

Failure is the reward worker's business: a function that raises, returns a non-number (a str
too) or a non-finite number raises here, naming the function, so the worker fails the row
(counted, logged, `task.on_reward_failure`) exactly as for any `Task.reward`; one that hangs
runs into the worker's timeout. Nothing here catches.

math-verify's own timeouts use SIGALRM, which only works on a main thread and would interrupt
whatever else the process does; they are switched off (`parsing_timeout=None`,
`timeout_seconds=None`) because every reward already runs under the worker's timeout, in a
process that is killed and restarted when it hangs.

Why functions are imported lazily and again after unpickling: a task is pickled into its reward
worker; holding the functions would pickle the user's objects, and resolving them in
`__setstate__` does the imports (math-verify's sympy, the user's module) while the worker starts,
before it takes its first row, so they do not count against a row's timeout.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from asyncflow.tasks.base import RewardBreakdown

NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
"""A number as `numeric` reads it (thousands separators allowed)."""

RESERVED_PARTS = ("mean", "failures", "timeouts", "dropped_groups")
"""Names the reward stage already logs under `reward/`; a part may not take one."""

_USER_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_BOXED = re.compile(r"\\boxed\s*\{\s*[^\s}]")
_ANSWER_TAG = re.compile(r"<answer>\s*\S.*?</answer>", re.DOTALL)
_FRACTION = re.compile(r"[-+]?(?:(\d+)?\\[dt]?frac\{([-+]?\d+)\}\{(\d+)\}|(\d+)/(\d+))")
_LATEX_SPACE = re.compile(r"\s+|\\[,;:! ]|\\left|\\right")


def _plain_number(text: str) -> bool:
    """`text` (math-verify's extracted answer) is written as a number: an integer or decimal
    (1,000 / 18.00 / -3) or a fraction in lowest terms (1/2, \\frac{-1}{2}, 2\\frac{1}{2}). Anything
    else, such as 7 - 5, 14/7, 14 \\div 7 or (14)/(7), restates arithmetic instead of answering."""
    text = _LATEX_SPACE.sub("", text.replace("{,}", ","))
    if NUMBER.fullmatch(text):
        return True
    m = _FRACTION.fullmatch(text)
    if m is None:
        return False
    whole, num, den = m[1], int(m[2] or m[4]), int(m[3] or m[5])
    proper = whole is None or 0 < num < den  # a mixed number's fraction is proper
    return den > 1 and math.gcd(num, den) == 1 and proper


def exact_reward(completion: str, answer: str, finished: bool, data: dict) -> float:
    return 1.0 if finished and completion.strip() == answer.strip() else 0.0


def last_number(text: str) -> Decimal | None:
    """The last number in `text` (see NUMBER), or None."""
    found = NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "")) if found else None


def numeric_reward(completion: str, answer: str, finished: bool, data: dict) -> float:
    number = last_number(completion)
    return 1.0 if number is not None and number == Decimal(answer.strip().replace(",", "")) \
        else 0.0


def format_reward(completion: str, answer: str, finished: bool, data: dict) -> float:
    return 1.0 if finished and (_BOXED.search(completion) or _ANSWER_TAG.search(completion)) \
        else 0.0


def _quiet_math_verify() -> None:
    """math-verify warns once per process that its (signal) timeouts are off: they are on purpose
    (module docstring), so the warning is marked as shown."""
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True


def math_reward(completion: str, answer: str, finished: bool, data: dict) -> float:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold = parse(answer if "\\boxed" in answer else f"${answer}$", parsing_timeout=None)
    pred = parse(completion, extraction_config=[LatexExtractionConfig(boxed_match_priority=0),
                                                ExprExtractionConfig()],
                 parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    # math-verify keeps arithmetic unevaluated ("7 - 5" parses as 7 - 1*5), or reduces it
    # (\frac{14}{7} parses as 2), and then finds it equal to 2: a policy that restates the
    # question would be paid for it. So a numeric answer must be written as a number (a list of
    # allowed forms: the forms of arithmetic are too many to list); symbolic answers keep
    # math-verify's equivalence.
    if getattr(gold[0], "is_Number", False) and not _plain_number(str(pred[-1])):
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


BUILTIN_REWARDS: dict[str, Callable[[str, str, bool, dict], float]] = {
    "exact": exact_reward,
    "numeric": numeric_reward,
    "math": math_reward,
    "format": format_reward,
}
"""Built-in rewards by name: `fn(completion, answer, finished, data) -> float`."""

_NEEDS = {"math": ("math_verify", "math-verify")}
"""Built-ins that need an optional package: name -> (module, pip name)."""


def normalize_specs(reward: Any, weights: list[float], field: str = "task.reward"
                    ) -> tuple[list[str], list[float]]:
    """(specs, weights) from a config's `reward` (one string or a list of them) and
    `reward_weights` (empty = 1.0 each); ValueError naming the field for a malformed one."""
    specs = [reward] if isinstance(reward, str) else list(reward)
    if not specs or not all(isinstance(s, str) for s in specs):
        raise ValueError(f"{field}={reward!r} must name a reward function or a list of them, "
                         f"e.g. {field}=math or {field}=[math,format]")
    weights = [float(w) for w in weights] if weights else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ValueError(f"{field}_weights={weights} has {len(weights)} weights for "
                         f"{len(specs)} reward functions {specs}; give one weight per function")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{field}_weights={weights} must be finite numbers")
    return specs, weights


def part_name(spec: str) -> str:
    """The name a reward function's value is reported under: the built-in name or the
    function's name."""
    return spec.rsplit(":", 1)[-1]


def resolve(spec: str, field: str = "task.reward") -> Callable[[str, str, bool, dict], float]:
    """The function `spec` names, as `fn(completion, answer, finished, data)`; ValueError naming
    the field for an unknown name, a module that does not import or a function that does not
    take (completion, answer, data)."""
    if spec in BUILTIN_REWARDS:
        if spec in _NEEDS:
            module, package = _NEEDS[spec]
            try:
                importlib.import_module(module)
            except ImportError:
                raise ValueError(f"{field}={spec!r} needs {package}: pip install "
                                 f"'asyncflow[tasks]'") from None
            _quiet_math_verify()
        return BUILTIN_REWARDS[spec]
    if not _USER_SPEC.fullmatch(spec):
        raise ValueError(f"{field}={spec!r} is neither a built-in reward {list(BUILTIN_REWARDS)} "
                         f"nor `module:function` (e.g. my_pkg.rewards:score)")
    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time error of the user's module is a config error
        raise ValueError(f"{field}={spec!r}: module {module_name!r} does not import "
                         f"({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{field}={spec!r}: module {module_name!r} has no function {name!r}")
    try:
        inspect.signature(fn).bind("completion", "answer", {})
    except TypeError:
        raise ValueError(f"{field}={spec!r}: {name}{inspect.signature(fn)} must take "
                         f"(completion, answer, data)") from None
    except ValueError:  # a builtin or C function without a signature: trust it
        pass
    return _UserReward(fn)


class _UserReward:
    """A user function `fn(completion, answer, data)` called as a built-in."""

    def __init__(self, fn: Callable[[str, str, dict], Any]):
        self.fn = fn

    def __call__(self, completion: str, answer: str, finished: bool, data: dict) -> Any:
        return self.fn(completion, answer, data)


def _as_reward(value: Any, spec: str) -> float:
    """`value` as a finite float; TypeError/ValueError naming the function otherwise."""
    if not hasattr(type(value), "__float__"):  # a str would parse: a reward is a number
        raise TypeError(f"reward function {spec} returned {type(value).__name__} {value!r:.60}, "
                        f"not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"reward function {spec} returned {number}, not a finite number")
    return number


class RewardFunctions:
    """The reward functions of a data task's `reward`/`reward_weights`, called as one reward.
    Picklable: only the specs travel; the functions are imported again on arrival."""

    def __init__(self, reward: Any, weights: list[float], field: str = "task.reward"):
        self.specs, self.weights = normalize_specs(reward, weights, field)
        self.names = [part_name(s) for s in self.specs]
        if len(self.specs) > 1:
            for name in self.names:
                if self.names.count(name) > 1 or name in RESERVED_PARTS:
                    raise ValueError(f"{field}={self.specs}: the part name {name!r} is taken "
                                     f"(parts are logged as reward/<name>; reserved: "
                                     f"{list(RESERVED_PARTS)}); rename the function")
        self.field = field
        self._fns = [resolve(s, field) for s in self.specs]

    @property
    def reads_data(self) -> bool:
        """Whether some function is the user's (which takes the dataset record)."""
        return any(s not in BUILTIN_REWARDS for s in self.specs)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_fns"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fns = [resolve(s, self.field) for s in self.specs]

    def __call__(self, completion: str, answer: str, finished: bool, data: dict
                 ) -> float | RewardBreakdown:
        values = [_as_reward(fn(completion, answer, finished, data), spec)
                  for fn, spec in zip(self._fns, self.specs, strict=True)]
        total = sum(w * v for w, v in zip(self.weights, values, strict=True))
        if len(values) == 1:
            return total
        return RewardBreakdown(total, dict(zip(self.names, values, strict=True)))
