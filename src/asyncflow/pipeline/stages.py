"""The RL stages: loops that get columns from the queue, compute, and put columns back.

```
 prompts --prompt_ids,uid--> rollout --response_ids,behaviour_logprobs,finished--> reward
   (rank 0)                 (rollout ranks)                                        (rollout ranks)
                                                                                     | reward
 train <--advantage-- advantage (first rollout rank, whole groups) <-----------------+
 (train ranks) <--ref_logprobs-- reference (train ranks, only when KL is on)
   | optimizer step -> weight sync -> rollout engines (commit = new policy version)
```

Every stage is `run_step(step) -> Metrics`: it returns once it has done its share of that step,
so the same objects run threaded (split placement: overlap) or one after another (colocated:
time-sliced). No stage calls another; the readiness of columns in the queue is the only coupling.
The graph that places them, and the queue columns they exchange, are declared in `graph.py`.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from asyncflow.algorithms import group_advantages, overlong_penalty
from asyncflow.engines import GenerationRequest, RolloutEngine, SamplingParams
from asyncflow.log import get_logger
from asyncflow.models import Tokenizer
from asyncflow.pipeline.reward_worker import RewardItem, RewardOutcome, RewardWorker
from asyncflow.pipeline.stage import Metrics, StageBase
from asyncflow.queue import Batch, GroupSampler, QueueClient, Ragged, StepSampler
from asyncflow.tasks import Problem, Task, encode_problem, split_completions

logger = get_logger(__name__)

TRAIN_COLUMNS = ["prompt_ids", "response_ids", "behaviour_logprobs", "advantage"]


@dataclass
class StepShape:
    """What every stage needs to know about a step."""

    prompts_per_step: int
    group_size: int
    num_steps: int
    max_staleness: int
    timeout_s: float
    chunk_rows: int = 1
    """Rows the streaming stages put and get at once (the train micro-batch: finer pieces would
    only add control round trips, ~0.2 ms of CPU each on both ends)."""

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


def group_range(step: int, prompts_per_step: int) -> tuple[int, int]:
    """Group ids of a step: prompt i of step s is group s * prompts_per_step + i."""
    return step * prompts_per_step, (step + 1) * prompts_per_step


def _id_lists(value) -> list[list[int]]:
    """Each row of a token-id column as a list (one `tolist` for the batch, not one per row)."""
    if not isinstance(value, Ragged):
        return value.tolist()
    ids, offsets = value.values.tolist(), value.offsets.tolist()
    return [ids[a:b] for a, b in itertools.pairwise(offsets)]


def stalled(what: str, timeout_s: float) -> TimeoutError:
    """The error of every wait on another rank: a dead or hung peer ends the run, never hangs it
    (the raising stage thread exits its rank; torchrun then stops the others)."""
    return TimeoutError(f"{what}: nothing arrived within run.timeout_s={timeout_s:g} s; another "
                        "rank died or hangs (see its log), or a step takes longer than the "
                        "timeout (raise run.timeout_s)")


def drain_step(q: QueueClient, stage: str, step: int, batch_size: int, timeout_s: float,
               columns: list[str], min_rows: int = 1):
    """Yield leased batches of `step` for `stage` until the step has none left for it."""
    while True:
        batch = q.get(stage, batch_size, timeout_s=timeout_s, sampler=StepSampler(step),
                      min_rows=min_rows, columns=columns)
        if len(batch) == 0:
            if batch.exhausted:
                return
            raise stalled(f"{stage}: waiting for rows of step {step}", timeout_s)
        yield batch


class PromptStage(StageBase):
    """Puts the step's prompts (group_size rows each) as new rows; blocks while the queue is full.

    Prompt i of step s is train problem s * prompts_per_step + i: the data cursor is the step."""

    name = "prompts"

    def __init__(self, q: QueueClient, problems: Callable[[int], Problem], tokenizer: Tokenizer,
                 shape: StepShape, first_step: int = 0):
        self.q, self.problems, self.tok, self.shape = q, problems, tokenizer, shape
        """`problems(index)`: the task's train problem (`task.train_problem`, or the rank's
        memory of it that the reward stage shares: `graph.train_problems`)."""
        self.first_step = first_step
        """A resumed run's restored queue may hold prompts of later steps already."""

    def run_step(self, step: int) -> Metrics:
        if step < self.first_step:
            return Metrics(self.name, step)
        N = self.shape.group_size
        groups = range(*group_range(step, self.shape.prompts_per_step))
        problems = [self.problems(g) for g in groups]
        encoded = Ragged.from_lists([encode_problem(self.tok, p) for p in problems], torch.long)
        # the N rows of a group share its prompt: one encoding per problem, copied by one gather
        prompt_ids = encoded.take(torch.arange(len(problems)).repeat_interleave(N))
        uids = torch.tensor([p.uid for p in problems for _ in range(N)], dtype=torch.long)
        group_ids = [g for g in groups for _ in range(N)]
        self.q.put({"prompt_ids": prompt_ids, "uid": uids}, step=step, group_ids=group_ids,
                   num_tokens=prompt_ids.lengths.tolist(),
                   timeout_s=self.shape.timeout_s * 10)
        return Metrics(self.name, step)


class VersionGate:
    """The one staleness enforcement point: rollout of step s waits for version >= s - eta."""

    def __init__(self, engine: RolloutEngine, max_staleness: int):
        self.engine, self.eta = engine, max_staleness
        self._cond = threading.Condition()
        self._cancelled = False

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def cancel(self) -> None:
        """Wake every waiter with an error: the run is stopping."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def wait_for(self, version: int, timeout_s: float) -> float:
        """Block until the engine holds `version` or newer; returns seconds waited."""
        t0 = time.perf_counter()
        with self._cond:
            if not self._cond.wait_for(lambda: self._cancelled or
                                       self.engine.policy_version >= version, timeout_s):
                raise stalled(f"rollout: waiting for policy version {version} (engine has "
                              f"{self.engine.policy_version})", timeout_s)
            if self.engine.policy_version < version:
                raise RuntimeError("rollout: the run is stopping")
        return time.perf_counter() - t0


class RolloutStage(StageBase):
    """Generates every row of the step it is allowed to start, putting finished groups onward."""

    name = "rollout"

    def __init__(self, q: QueueClient, engine: RolloutEngine, gate: VersionGate,
                 sampling: SamplingParams, shape: StepShape, seed: int, batch_size: int):
        self.q, self.engine, self.gate, self.sampling = q, engine, gate, sampling
        self.shape, self.seed = shape, seed
        self.batch_size = batch_size  # rows per get: this rank's share, so rollout ranks split work

    def run_step(self, step: int) -> Metrics:
        m = Metrics(self.name, step)
        with m.trace("wait_version"):
            wait_s = self.gate.wait_for(step - self.shape.max_staleness, self.shape.timeout_s)
        t0 = time.perf_counter()
        counts = [0, 0, 0, 0, 0]  # rows, tokens, engine errors, rows spanning a commit, truncated
        for batch in drain_step(self.q, self.name, step, self.batch_size, self.shape.timeout_s,
                                ["prompt_ids"]):
            prompts = _id_lists(batch.columns["prompt_ids"])
            base = vars(self.sampling)  # 2.4x faster than dataclasses.replace, per row
            requests = [
                GenerationRequest(str(row), prompt, SamplingParams(
                    **{**base, "seed": self.seed * 1_000_003 + row}))
                for row, prompt in zip(batch.row_ids, prompts, strict=True)]
            pending = {}  # group id -> rows of this batch still generating
            for g in batch.group_ids:
                pending[g] = pending.get(g, 0) + 1
            group_of = dict(zip(batch.row_ids, batch.group_ids, strict=True))
            prompt_len = dict(zip(batch.row_ids, (len(p) for p in prompts), strict=True))
            with m.span("generate"):
                self._generate(batch, requests, pending, group_of, prompt_len, counts)
            self.q.ack(batch)
        num_rows, num_tokens, num_errors, num_spanning, num_truncated = counts
        if num_rows and num_errors == num_rows:  # nothing to learn from: stop, do not pretend
            raise RuntimeError(f"rollout: the engine refused all {num_rows} rows of step {step} "
                               "(reasons above); the run would train nothing")
        gen_s = time.perf_counter() - t0
        m.total("rollout/gen_time_s", gen_s)
        m.total("rollout/gate_wait_s", wait_s)
        m.total("rollout/generated_tokens", num_tokens)
        m.total("rollout/errors", num_errors)
        # new weights arrived while these rows were generating, and generation went on
        m.total("rollout/rows_spanning_versions", num_spanning)
        m.mean("response/length_mean", num_tokens / max(num_rows, 1), num_rows)
        # stopped by max_new_tokens (or the context window) before EOS: raise the limit if high
        m.mean("response/truncated_frac", num_truncated / max(num_rows, 1), num_rows)
        return m

    def _generate(self, batch: Batch, requests, pending, group_of, prompt_len,
                  counts: list[int]) -> None:
        """Stream completions; put finished groups onward in chunks of about chunk_rows rows."""
        done: dict[int, list] = {}
        ready: list = []  # rows of finished groups not yet put
        left = len(requests)  # one completion per request
        for c in self.engine.stream(requests):
            left -= 1
            row = int(c.request_id)
            counts[3] += c.policy_version_end != c.policy_version_start
            counts[4] += c.finish_reason == "length"
            if c.finish_reason == "error":
                counts[2] += 1
                logger.warning("rollout: row %d refused by the engine: %s", row, c.error)
            g = group_of[row]
            done.setdefault(g, []).append((row, c))
            pending[g] -= 1
            if pending[g] == 0:
                ready.extend(done.pop(g))
            if len(ready) >= self.shape.chunk_rows or not left:
                self._put(batch, ready, prompt_len)
                counts[0] += len(ready)
                counts[1] += sum(len(c.token_ids) for _, c in ready)
                ready = []

    def _put(self, batch: Batch, finished: list, prompt_len: dict[int, int]) -> None:
        """Put finished groups onward; the lease gives them up in the same step (`ack=`), so a
        checkpoint taken mid-batch never redelivers a row whose response is stored. The batch's
        own `ack` after the last put is then a no-op (it would end rows never put)."""
        rows = [r for r, _ in finished]
        comps = [c for _, c in finished]
        self.q.put({
            "response_ids": Ragged.from_lists([c.token_ids for c in comps], torch.long),
            "behaviour_logprobs": Ragged.from_lists([c.logprobs for c in comps], torch.float32),
            "finished": torch.tensor([c.finish_reason == "stop" for c in comps], dtype=torch.long),
        }, rows=rows, policy_versions=[c.policy_version_start for c in comps],
            num_tokens=[prompt_len[r] + len(c.token_ids) for r, c in zip(rows, comps, strict=True)],
            ack=batch)


def evaluate(engine: RolloutEngine, scorer: RewardWorker, tokenizer: Tokenizer,
             problems: list[Problem], max_new_tokens: int
             ) -> tuple[float, int, list[tuple[RewardItem, RewardOutcome]]]:
    """Greedy accuracy on held-out problems with the engine's current (pinned) weights, the
    number of reward failures (each scored 0: a held-out row is never dropped), and each
    problem's completion with its outcome."""
    requests = [GenerationRequest(f"eval{p.uid}", encode_problem(tokenizer, p),
                                  SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
                for p in problems]
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    texts = split_completions(tokenizer, [c.token_ids for c in engine.generate(requests)], eos)
    items = [RewardItem(p.uid, text, p.answer, finished, p.data)
             for p, (text, finished) in zip(problems, texts, strict=True)]
    outcomes = scorer.score(items)
    for p, o in zip(problems, outcomes, strict=True):
        if o.error is not None:
            logger.warning("eval: held-out problem %d: reward failed: %s", p.uid, o.error)
    return (sum(o.value or 0.0 for o in outcomes) / len(problems),
            sum(o.value is None for o in outcomes), list(zip(items, outcomes, strict=True)))


class EvalStage(StageBase):
    """Held-out greedy accuracy every `every` steps and after the last, on the first rollout
    rank's main thread, before that step's rollout. It uses the weights rollout of the step may
    use (version >= step - eta; the last version after the last step) and holds `commit_lock` so
    no new version lands mid-evaluation. Its own reward worker: the reward thread keeps scoring
    meanwhile. The first `num_samples` completions of each evaluation go to `samples_path` (JSON
    lines), so what the reward pays for can be read, not only its mean."""

    name = "eval"

    def __init__(self, engine: RolloutEngine, gate: VersionGate, commit_lock: threading.Lock,
                 task: Task, tokenizer: Tokenizer, shape: StepShape, every: int, size: int,
                 max_new_tokens: int, reward_timeout_s: float, samples_path: Path | None = None,
                 num_samples: int = 8):
        self.engine, self.gate, self.commit_lock, self.shape = engine, gate, commit_lock, shape
        self.tok, self.every, self.max_new_tokens = tokenizer, every, max_new_tokens
        self.problems = task.heldout_problems()[:size]
        self.scorer = RewardWorker(task, reward_timeout_s)
        self.samples_path, self.num_samples = samples_path, num_samples

    def run_step(self, step: int) -> Metrics:
        m = Metrics(self.name, step)
        if step % self.every and step != self.shape.num_steps:
            return m
        last = step == self.shape.num_steps  # the final evaluation: the final weights
        self.gate.wait_for(step if last else step - self.shape.max_staleness,
                           self.shape.timeout_s)
        with self.commit_lock, m.span("eval"):
            acc, failures, scored = evaluate(self.engine, self.scorer, self.tok, self.problems,
                                             self.max_new_tokens)
        if self.samples_path is not None:
            with open(self.samples_path, "a") as f:
                for item, o in scored[:self.num_samples]:
                    f.write(json.dumps({"step": step, "uid": item.row, "answer": item.answer,
                                        "completion": item.completion,
                                        "reward": o.value}) + "\n")
        m.set("eval/accuracy", acc)
        m.set("eval/reward_failures", failures)
        m.set("eval/policy_version", self.engine.policy_version)
        return m

    def close(self) -> None:
        self.scorer.close()


class WeightReceiveStage(StageBase):
    """Split placement: receives each new policy version from the train mesh into the engine
    (under `commit_lock`) and wakes the gate. Step s ends once the engine holds version s + 1;
    a resumed run first receives the restored weights."""

    name = "weights"

    def __init__(self, engine: RolloutEngine, gate: VersionGate, commit_lock: threading.Lock,
                 sync):
        self.engine, self.gate, self.commit_lock, self.sync = engine, gate, commit_lock, sync

    def run_step(self, step: int) -> Metrics:
        m = Metrics(self.name, step)
        while self.engine.policy_version < step + 1:
            stall0 = self.engine.health().commit_stall_s
            t0 = time.perf_counter()
            with m.trace("weight_recv"):
                version = self.sync.receive(self.engine, self.commit_lock)
            self.gate.notify()
            m.record({"weights/recv_s": time.perf_counter() - t0,
                      # generation stood still for the swap (and KV recompute): exposed sync
                      "weights/exposed_s": self.engine.health().commit_stall_s - stall0},
                     step=version - 1)
        return m


FAILED_REWARD = {"zero": 0.0, "drop_group": math.nan}
"""Reward a failed row gets, by `TaskConfig.on_reward_failure`; NaN makes the advantage stage
zero the row's whole group."""


class RewardStage(StageBase):
    """Scores responses against the task's answers in an isolated worker process. A reward that
    raises, returns a non-finite number or a non-number, runs past `timeout_s` or kills its process
    costs that row a counted, logged failure, never the run; the row's reward is then
    `FAILED_REWARD[on_failure]`."""

    name = "reward"

    def __init__(self, q: QueueClient, task: Task, tokenizer: Tokenizer, shape: StepShape,
                 timeout_s: float = 10.0, on_failure: str = "zero",
                 overlong: tuple[int, int, float] = (0, 0, 0.0),
                 problems: Callable[[int], Problem] | None = None):
        self.q, self.task, self.tok, self.shape = q, task, tokenizer, shape
        self.problems = problems or task.train_problem
        """Where a row's problem (its answer) comes from: `graph.train_problems`, shared with the
        prompt stage."""
        self.overlong = overlong
        """(max_new_tokens, buffer, penalty): DAPO's soft overlong punishment (buffer 0: off)."""
        self.eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        self.failed_reward = FAILED_REWARD[on_failure]
        self.worker = RewardWorker(task, timeout_s)

    def score(self, rows: list[int], responses: list[list[int]], finished: list[bool],
              uids: list[int]) -> list[RewardOutcome]:
        """One outcome per row; failures are logged with the row id, problem uid and reason."""
        items = []
        problems: dict[int, Problem] = {}  # a group's rows share their problem: look it up once
        texts = split_completions(self.tok, responses, self.eos)
        for row, (text, stopped), fin, uid in zip(rows, texts, finished, uids, strict=True):
            if uid not in problems:
                problems[uid] = self.problems(uid)
            p = problems[uid]
            items.append(RewardItem(row, text, p.answer, stopped and fin, p.data))
        outcomes = self.worker.score(items)
        for row, uid, o in zip(rows, uids, outcomes, strict=True):
            if o.error is not None:
                logger.warning("reward: row %d (problem %d) failed: %s", row, uid, o.error)
        return outcomes

    def run_step(self, step: int) -> Metrics:
        m = Metrics(self.name, step)
        for batch in drain_step(self.q, self.name, step, self.shape.rows_per_step,
                                self.shape.timeout_s, ["response_ids", "finished", "uid"],
                                # a step smaller than a chunk is scored whole
                                min_rows=min(self.shape.chunk_rows, self.shape.rows_per_step)):
            with m.span("score"):
                responses = batch.columns["response_ids"]
                outcomes = self.score(batch.row_ids, _id_lists(responses),
                                      [bool(f) for f in batch.columns["finished"].tolist()],
                                      batch.columns["uid"].tolist())
                rewards = [self.failed_reward if o.value is None else o.value for o in outcomes]
                reward = torch.tensor(rewards, dtype=torch.float32)
                if self.overlong[1]:
                    penalty = overlong_penalty(responses.lengths, *self.overlong)
                    reward += penalty
                    m.mean("reward/overlong_penalty", penalty.mean().item(), len(penalty))
                self.q.put({"reward": reward}, rows=batch.row_ids, ack=batch)  # ends the batch
            scored = [r for r in rewards if not math.isnan(r)]  # a dropped row has none
            if scored:
                m.mean("reward/mean", sum(scored) / len(scored), len(scored))
            parts: dict[str, list[float]] = {}  # e.g. one per reward function; scored rows only
            for o in outcomes:
                for name, value in (o.parts or {}).items():
                    parts.setdefault(name, []).append(value)
            for name, values in parts.items():
                m.mean(f"reward/{name}", sum(values) / len(values), len(values))
            m.total("reward/failures", sum(o.value is None for o in outcomes))
            m.total("reward/timeouts", sum(o.timed_out for o in outcomes))
        return m

    def close(self) -> None:
        self.worker.close()


class AdvantageStage(StageBase):
    """Group-relative advantages over whole groups (one instance in the job)."""

    name = "advantage"

    def __init__(self, q: QueueClient, shape: StepShape, baseline: str, normalize_std: bool,
                 resumed: bool = False, mask_truncated: bool = False):
        self.q, self.shape = q, shape
        self.baseline, self.normalize_std = baseline, normalize_std
        self.mask_truncated = mask_truncated
        """DAPO overlong filtering: rows without EOS (`finished` 0) get advantage 0."""
        self.columns = ["reward", "finished"] if mask_truncated else ["reward"]
        self.groups_done: dict[int, int] = (
            {s: n // shape.group_size for s, n in q.taken(self.name).items()} if resumed else {})
        """step -> groups done; a resumed run starts from the restored queue's count."""

    def run_step(self, step: int) -> Metrics:
        m = Metrics(self.name, step)
        P, N = self.shape.prompts_per_step, self.shape.group_size
        while self.groups_done.get(step, 0) < P:
            left = (P - self.groups_done.get(step, 0)) * N
            batch = self.q.get(self.name, P * N, timeout_s=self.shape.timeout_s,
                               sampler=GroupSampler(), columns=self.columns,
                               min_rows=min(self.shape.chunk_rows, left))
            if len(batch) == 0:
                raise stalled(f"advantage: waiting for whole groups of step {step}",
                              self.shape.timeout_s)
            with m.span("advantage"):
                keys = list(zip(batch.group_ids, batch.row_ids, strict=True))
                order = sorted(range(len(batch)), key=keys.__getitem__)
                rewards_GN = batch.columns["reward"][order].view(-1, N)
                # a group with a NaN reward (a failed row under drop_group) gets advantage 0
                adv_GN, _ = group_advantages(rewards_GN, self.baseline, self.normalize_std)
                dropped_G = ~torch.isfinite(rewards_GN).all(dim=1)
                adv = torch.empty(len(batch))
                adv[order] = adv_GN.flatten()
                if self.mask_truncated:
                    truncated = batch.columns["finished"] == 0
                    adv[truncated] = 0.0
                    masked: dict[int, int] = {}  # step -> rows masked
                    for s, t in zip(batch.steps, truncated.tolist(), strict=True):
                        masked[s] = masked.get(s, 0) + t
                    for s, n in masked.items():
                        m.total("advantage/masked_truncated", float(n), step=s)
                self.q.put({"advantage": adv}, rows=batch.row_ids, ack=batch)  # ends the batch
            flat_G = ((rewards_GN == rewards_GN[:, :1]).all(dim=1) | dropped_G).tolist()
            counts: dict[int, list[int]] = {}  # step -> [groups, flat ones, dropped ones]
            for g, (flat, dropped) in enumerate(zip(flat_G, dropped_G.tolist(), strict=True)):
                c = counts.setdefault(batch.steps[order[g * N]], [0, 0, 0])
                c[0], c[1], c[2] = c[0] + 1, c[1] + flat, c[2] + dropped
            for s, (groups, flat, dropped) in counts.items():  # one record per step, not group
                self.groups_done[s] = self.groups_done.get(s, 0) + groups
                # as 1.0 and 0.0 weighted by their counts: the sum stays an exact count
                m.mean("advantage/flat_group_frac", 1.0, flat, step=s)
                m.mean("advantage/flat_group_frac", 0.0, groups - flat, step=s)
                m.total("reward/dropped_groups", float(dropped), step=s)
        return m  # groups of later steps are reported for their own step
