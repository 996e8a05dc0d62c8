"""The rollout-engine protocol and the data that crosses it.

Token ids in, token ids out: an engine never decodes or re-encodes text. Every completion carries
the log-prob of each generated token and the policy version(s) of the weights that produced it, so
the trainer can compute importance ratios and staleness without asking the engine anything else.

The protocol is shaped after SGLang's RL surface so that an adapter is a thin mapping:

| RolloutEngine             | SGLang                                                        |
|---------------------------|---------------------------------------------------------------|
| generate / stream         | `generate(input_ids=..., return_logprob=True)`                |
| load_weights(named)       | `update_weights_from_distributed(names, dtypes, shapes)` or   |
|                           | `update_weights_from_tensor` (one call per bucket)            |
| commit_weights(version)   | `weight_version=` of the last update + `continue_generation`  |
| pause / resume            | `pause_generation(mode="in_place")` / `continue_generation`   |
| abort(request_ids)        | `abort_request(rid)`                                          |
| health / shutdown         | `/health_generate` / `shutdown`                               |

`asyncflow.engines.sglang_engine` is that adapter; its docstring says what differs in the
SGLang version it targets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length", "abort", "error"]
"""stop: eos or a stop token (included in token_ids); length: max_new_tokens or the context window;
abort: `abort()` was called for it; error: the request was invalid (see `Completion.error`)."""


@dataclass
class RolloutEngineConfig:
    """Common base of engine configs (the `engine=` config group); subclasses add their fields."""

    kind: str = "torch"
    """Which engine: one of `asyncflow.engines.ENGINE_KINDS`."""
    device: str = "cpu"
    """Where the engine runs: "cpu", "cuda", "cuda:1", ... ("cuda" is the rank's own GPU)."""


@dataclass
class SamplingParams:
    """How one request samples. Checked per request by the engine (`check`), not at construction:
    a bad request fails alone and the rest of its batch completes."""

    max_new_tokens: int = 128
    """Most tokens to generate (>= 1); generation also stops at the context window."""
    temperature: float = 1.0
    """Softmax temperature (>= 0); 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    stop_token_ids: tuple[int, ...] | None = None
    """Tokens that end generation (kept in the output); None means the model's eos ids."""
    ignore_eos: bool = False
    """Never stop on a token (benchmarks; always generate max_new_tokens)."""
    seed: int | None = None
    """Seed for this request's random draws; None draws one from the engine's generator. The same
    seed, prompt and weights give the same tokens whatever else is in the batch."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self, vocab_size: int) -> None:
        """Raise ValueError naming the first invalid field, its value and what is allowed."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; use 1.0 to disable")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0; use 0 to disable")
        bad = [t for t in self.stop_token_ids or () if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")


@dataclass
class GenerationRequest:
    """One prompt to complete."""

    request_id: str
    """Caller's id, unique among requests in flight; `abort` and completions use it."""
    prompt_ids: Sequence[int]
    """Prompt token ids (non-empty, each in [0, vocab_size))."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Sampling parameters of this request."""


@dataclass
class Completion:
    """The result of one request. Token i was sampled by weights of version
    `policy_version_at(i)`; `policy_version_start == policy_version_end` unless a commit
    happened while the request was in flight."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    """Generated tokens (a stop token included)."""
    logprobs: list[float]
    """log softmax(logits / T) at each generated token, fp32, before top-k/top-p truncation
    (T = 1 for greedy requests): the distribution the trainer evaluates."""
    finish_reason: FinishReason
    policy_version_start: int
    """Version of the weights that sampled the first token (engine version at submission for
    requests that produced none)."""
    policy_version_end: int
    """Version of the weights that sampled the last token."""
    version_changes: list[tuple[int, int]] = field(default_factory=list)
    """(token index, version) for each commit during generation: tokens from that index on were
    sampled by that version."""
    error: str | None = None
    """Why the request was refused, when finish_reason is "error"."""

    def policy_version_at(self, token_index: int) -> int:
        version = self.policy_version_start
        for start, v in self.version_changes:
            if token_index >= start:
                version = v
        return version


def check_unique_ids(requests: Sequence[GenerationRequest]) -> None:
    """ValueError if two requests share an id (their completions could not be told apart)."""
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"request ids {dup} appear more than once; ids must be unique")


def check_prompt(prompt_ids: Sequence[int], vocab_size: int, window: int) -> list[int]:
    """The prompt as a list of ints; ValueError if it is empty, leaves no room for a token in a
    context window of `window` positions, or holds ids outside [0, vocab_size)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("empty prompt; pass at least one token id (e.g. bos)")
    if len(prompt) >= window:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the context "
                         f"window of {window}; shorten it or raise max_seq_len")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                         f"[0, {vocab_size})")
    return prompt


def request_seed(sampling: SamplingParams, rng: torch.Generator) -> int:
    """The request's own seed, or one drawn from the engine's generator (never a fixed default:
    a group's copies of one prompt must sample independently)."""
    if sampling.seed is not None:
        return sampling.seed
    return int(torch.randint(0, 2**62, (), generator=rng))


def in_request_order(requests: Sequence[GenerationRequest],
                     completions: Iterable[Completion]) -> list[Completion]:
    """The completions of `requests` (ids unique), in request order."""
    order = {r.request_id: i for i, r in enumerate(requests)}
    out: list[Completion | None] = [None] * len(requests)
    for c in completions:
        out[order[c.request_id]] = c
    return out  # type: ignore[return-value]


def refused(req: GenerationRequest, message: str, policy_version: int) -> Completion:
    """The completion of a request an engine refused: no tokens, finish_reason "error"."""
    return Completion(req.request_id, list(req.prompt_ids), [], [], "error", policy_version,
                      policy_version, error=message)


@dataclass
class EngineHealth:
    """A snapshot of an engine's state."""

    healthy: bool
    policy_version: int
    paused: bool
    num_running: int
    """Requests holding a slot."""
    num_waiting: int
    """Requests queued for a slot."""
    commit_stall_s: float = 0.0
    """Total seconds generation stood still for weight commits (the exposed sync time)."""


class RolloutEngine(Protocol):
    """Generates completions; takes new weights without stopping (load, then commit).

    Thread contract: one thread calls `generate`/`stream`; any other thread may call
    `load_weights`, `commit_weights`, `pause`, `resume`, `abort` and `health` meanwhile.
    """

    @property
    def policy_version(self) -> int: ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Complete every request; results in request order. Invalid requests come back with
        finish_reason "error"; they never fail the others."""
        ...

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[Completion]:
        """Like `generate`, yielding each completion as soon as it finishes."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a bucket of full tensors (HF names) into staging; generation goes on meanwhile."""
        ...

    def commit_weights(self, policy_version: int) -> None:
        """Swap the staged weights in at the next safe point and return once they are live."""
        ...

    def pause(self) -> None:
        """Stop starting decode iterations; in-flight requests keep their state."""
        ...

    def resume(self) -> None: ...

    def abort(self, request_ids: Iterable[str]) -> None:
        """Finish these requests (waiting or running) with finish_reason "abort"."""
        ...

    def health(self) -> EngineHealth: ...

    def shutdown(self) -> None: ...
