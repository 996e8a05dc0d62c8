"""Train-mesh stages: reference log-probs (only with KL) and the streaming policy update.

The train stage consumes micro-batches of step s as soon as their advantages are ready
(`streaming`), runs forward/backward on each, and steps once the step's rows are all consumed,
dividing by the all-reduced token (or row) count: exactly the full-batch mean. Every train rank
runs the same number of forward/backward passes per step (FSDP collectives): the queue answers
the ranks together, and a rank left without rows runs a zero-weight dummy pass. Micro-batches
are whole groups in a fixed order (see DataParallelDrain), so with max_staleness=0 streaming and
sequential training compute the same thing bit for bit.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from asyncflow.algorithms import policy_loss, rows_with_gradient, sequence_weights
from asyncflow.engines.fsdp_engine import FSDPTrainEngine, all_reduce
from asyncflow.engines.sequences import PackedBatch, SharedPromptBatch, pack, pack_shared
from asyncflow.log import get_logger
from asyncflow.pipeline.stage import Metrics, StageBase
from asyncflow.pipeline.stages import StepShape, group_range, stalled
from asyncflow.queue import Batch, GroupRangeSampler, QueueClient, StepSampler
from asyncflow.weights import BackgroundSender

logger = get_logger(__name__)

LOSS_SUMS = ["loss/sum", "loss/clip_frac", "loss/ratio_mean", "loss/mismatch_kl",
             "loss/is_weight_mean"]


def _dummy_batch(device) -> PackedBatch:
    """One token of prompt and one of response, for a rank with no rows in a collective pass."""
    return pack([torch.zeros(1, dtype=torch.long)], [torch.zeros(1, dtype=torch.long)], device)


class DataParallelDrain:
    """The micro-batches of one step for this rank of a data-parallel mesh, in canonical order.

    Round k holds the step's groups [first + k*G, first + (k+1)*G), G = (micro_batch_size /
    group_size) * dp_size, and is answered once all of them are ready, split across the ranks by
    tokens. Its content never depends on timing, so streaming computes exactly what the
    sequential pipeline computes. With streaming off the last round is awaited first (the step
    is then fully generated) and the rounds are processed in the same order afterwards."""

    def __init__(self, q: QueueClient, stage: str, group, dp_rank: int, dp_size: int,
                 shape: StepShape, micro_batch_size: int, columns: list[str], streaming: bool,
                 resumed: bool = False):
        if micro_batch_size % shape.group_size:
            raise ValueError(f"trainer.micro_batch_size={micro_batch_size} must be a multiple of "
                             f"pipeline.group_size={shape.group_size} (micro-batches hold whole "
                             "groups)")
        self.q, self.stage, self.group = q, stage, group
        self.dp_rank, self.dp_size, self.shape = dp_rank, dp_size, shape
        self.groups_per_round = micro_batch_size // shape.group_size * dp_size
        self.columns, self.streaming = columns, streaming
        self.done_rows: dict[int, int] = q.taken(stage) if resumed else {}
        """step -> rows of it this stage consumed before a resume (from the restored queue):
        whole rounds are skipped, a round cut in half by a crash sends the step down
        `_rest_of_step`."""

    def _fetch(self, sampler, rows: int) -> tuple[Batch, bool]:
        """This rank's part of one collective get; (batch, whether any rank got rows)."""
        if self.dp_size > 1:
            batch = self.q.get_balanced(self.stage, self.dp_rank, self.dp_size, rows,
                                        timeout_s=self.shape.timeout_s, sampler=sampler,
                                        columns=self.columns)
            n = torch.tensor([len(batch)])
            dist.all_reduce(n, group=self.group)  # a rank may legitimately get no rows
            return batch, n.item() > 0
        batch = self.q.get(self.stage, rows, timeout_s=self.shape.timeout_s, sampler=sampler,
                           columns=self.columns)
        return batch, len(batch) > 0

    def _get(self, step: int, first: int, end: int) -> Batch:
        batch, got = self._fetch(GroupRangeSampler(first, end),
                                 (end - first) * self.shape.group_size)
        if not got:
            raise stalled(f"{self.stage}: waiting for groups [{first}, {end}) of step {step}",
                          self.shape.timeout_s)
        return batch

    def _rest_of_step(self, step: int):
        """A resumed step one of whose rounds some rank had consumed and another had not (a
        crash between their acks): the step's remaining rows, as they are ready. Their order is no
        longer canonical, which only a stage resumed after such a crash sees."""
        rows = self.groups_per_round * self.shape.group_size // self.dp_size
        while True:
            batch, got = self._fetch(StepSampler(step), rows)
            if got:
                yield batch
            elif batch.exhausted:  # answered together: every rank sees it at the same call
                return
            else:
                raise stalled(f"{self.stage}: waiting for the rest of step {step}",
                              self.shape.timeout_s)

    def __call__(self, step: int):
        first, end = group_range(step, self.shape.prompts_per_step)
        rounds = [(g, min(g + self.groups_per_round, end))
                  for g in range(first, end, self.groups_per_round)]
        N = self.shape.group_size
        done = self.done_rows.pop(step, 0)  # rows a resumed stage had consumed already
        if done not in {(lo - first) * N for lo, _ in rounds} | {(end - first) * N}:
            yield from self._rest_of_step(step)
            return
        rounds = [(lo, hi) for lo, hi in rounds if (lo - first) * N >= done]
        if not rounds:
            return
        last = None if self.streaming else self._get(step, *rounds[-1])
        for k, (lo, hi) in enumerate(rounds):
            yield last if last is not None and k == len(rounds) - 1 else self._get(step, lo, hi)


class ReferenceStage(StageBase):
    """Log-probs of the frozen reference policy for every row (only when kl_coef > 0)."""

    name = "reference"

    def __init__(self, q: QueueClient, engine: FSDPTrainEngine, drain: DataParallelDrain,
                 temperature: float):
        self.q, self.engine, self.drain, self.t = q, engine, drain, temperature

    def run_step(self, step: int) -> Metrics:
        m = Metrics(self.name, step)
        for batch in self.drain(step):
            with m.span("ref_logprobs"):
                if len(batch) == 0:
                    self.engine.logprobs(_dummy_batch(self.engine.device), self.t)
                    continue
                packed = pack_shared(batch.columns["prompt_ids"], batch.columns["response_ids"],
                                     self.engine.device)
                ref = packed.gather_response(self.engine.logprobs(packed, self.t).cpu())
                self.q.put({"ref_logprobs": ref}, rows=batch.row_ids, ack=batch)  # ends it
        return m


class TrainStage(StageBase):
    """Streaming PPO-clip updates; one optimizer step (one new policy version) per step."""

    name = "train"

    def __init__(self, q: QueueClient, engine: FSDPTrainEngine, drain: DataParallelDrain,
                 algo, temperature: float, weight_sync, report: Callable[[str, int, Metrics], None],
                 local_engine=None, background: bool = False, accounting: Path | None = None,
                 checkpoint: Callable[[int], None] | None = None,
                 at_close: Callable[[], None] | None = None, restored_step: int | None = None):
        self.q, self.engine, self.drain, self.algo = q, engine, drain, algo
        self.t, self.sync, self.local_engine = temperature, weight_sync, local_engine
        self.report = report
        """Where the weight send of each step is reported, as stage `weight_send` (in the
        background it ends after the step does)."""
        self.use_kl = algo.kl_coef > 0
        self.max_staleness = drain.shape.max_staleness
        self._last_end = time.perf_counter()
        # Background only where a remote engine receives: a local engine is loaded in line.
        self.sender = (BackgroundSender(weight_sync, self._sent)
                       if background and local_engine is None else None)
        self.accounting = open(accounting, "a") if accounting is not None else None
        """One JSON line per step with the uids of the problems this rank trained."""
        self.checkpoint, self.at_close = checkpoint, at_close
        """`checkpoint(version)`: after the optimizer step, before the weights leave (see
        asyncflow.checkpoint); `at_close()`: after the last step (e.g. the final export)."""
        self.restored_step = restored_step

    def begin(self) -> None:
        """A resumed run hands the restored weights (version restored_step) to the engines."""
        if self.restored_step is not None:
            self.send_weights(self.restored_step - 1, Metrics(self.name, self.restored_step - 1))

    def _sent(self, version: int, values: dict[str, float]) -> None:
        m = Metrics("weight_send", version - 1)
        m.record(values)
        self.report("weight_send", version - 1, m)

    def send_weights(self, step: int, m: Metrics) -> None:
        """Send the current weights (version step + 1) to the rollout engines."""
        eng = self.engine
        if self.sender is not None:
            with m.span("weight_gather"):
                named = [(n, t.detach().clone()) for n, t in eng.full_weights()]
                m.set("weights/wait_previous_s", self.sender.submit(named, eng.policy_version))
        else:
            with m.span("weight_send"):
                self._sent(eng.policy_version, self.sync.send(
                    eng.full_weights(), eng.policy_version, self.local_engine))

    def close(self) -> None:
        if self.sender is not None:
            self.sender.wait()
        if self.accounting is not None:
            self.accounting.close()
        if self.at_close is not None:
            self.at_close()

    def _loss_fn(self, packed: PackedBatch | SharedPromptBatch, batch: Batch, keep: torch.Tensor):
        cols = batch.columns
        behaviour = packed.scatter_response(cols["behaviour_logprobs"].take(keep))
        adv = cols["advantage"][keep].float()
        weights = sequence_weights(packed.response_mask_BT, self.algo.aggregation)
        ref = packed.scatter_response(cols["ref_logprobs"].take(keep)) if self.use_kl else None
        return lambda lp: policy_loss(
            lp, behaviour, adv, weights, self.algo.clip_low, self.algo.clip_high,
            tis_cap=self.algo.tis_cap, ref_logprobs_BT=ref, kl_coef=self.algo.kl_coef,
            kl_kind=self.algo.kl_kind,
            # decoupled objective: with one update per batch the proximal policy is the trainer's
            # own current policy, so its log-probs are this forward's, detached (no extra pass)
            proximal_logprobs_BT=lp.detach() if self.algo.proximal else None)

    def _record_staleness(self, m: Metrics, batch: Batch) -> None:
        # a few distinct versions among 256 rows: counted in Python, not with six tensor ops
        version = self.engine.policy_version
        counts, rows = Counter(batch.policy_versions), len(batch.policy_versions)
        m.max("staleness/max", version - min(counts))
        m.mean("staleness/mean", sum((version - v) * n for v, n in counts.items()) / rows, rows)
        for v in sorted(counts, reverse=True):
            m.total(f"staleness/count_{version - v}", counts[v])
        if version - min(counts) > self.max_staleness:  # the gate makes this impossible: a bug
            for row, v in zip(batch.row_ids, batch.policy_versions, strict=True):
                if version - v > self.max_staleness:
                    logger.error("row %d has staleness %d > max_staleness %d", row, version - v,
                                 self.max_staleness)
                    m.total("staleness/violations", 1)

    def _micro_batch(self, m: Metrics, batch: Batch, acc: dict[str, float]) -> None:
        """Forward/backward of one micro-batch's rows that carry gradient; every row counts in the
        step's normaliser. A rank with nothing to train runs a zero-weight pass (FSDP collectives
        of every rank stay in step)."""
        eng = self.engine
        keep = torch.arange(len(batch))
        if len(batch):
            self._record_staleness(m, batch)
            acc["normaliser"] += (int(batch.columns["response_ids"].lengths.sum())
                                  if self.algo.aggregation == "token-mean" else len(batch))
            if not self.use_kl:
                keep = rows_with_gradient(batch.columns["advantage"])
            m.total("train/skipped_rows", len(batch) - len(keep))
        with m.span("fwd_bwd"):
            if not len(keep):
                eng.forward_backward(_dummy_batch(eng.device), lambda lp: (lp.sum() * 0.0, {}),
                                     self.t)
                return
            cols = batch.columns
            packed = pack_shared(cols["prompt_ids"].take(keep), cols["response_ids"].take(keep),
                                 eng.device)
            stats = eng.forward_backward(packed, self._loss_fn(packed, batch, keep), self.t)
        n = packed.num_response_tokens
        acc["trained_tokens"] += n
        acc["trained_normaliser"] += n if self.algo.aggregation == "token-mean" else len(keep)
        for k in LOSS_SUMS + (["loss/kl"] if self.use_kl else []):
            acc[k] += stats[k]

    def _record_loss(self, m: Metrics, total: dict[str, float], normaliser: float) -> None:
        """The loss is a mean over every row of the step (skipped rows add exactly 0); the
        diagnostics (clip fraction, ratio, mismatch, IS weight, KL) are means over the rows that
        were trained, the only ones whose trainer log-probs were computed."""
        m.set("loss/mean", total["loss/sum"] / normaliser if normaliser else 0.0)
        trained = total["trained_normaliser"]
        for k in LOSS_SUMS[1:] + (["loss/kl"] if self.use_kl else []):
            m.set(k, total[k] / trained if trained else 0.0)

    def _update(self, m: Metrics, step: int) -> dict[str, float]:
        """Every micro-batch of the step, then one optimizer step; the step's all-reduced sums."""
        keys = ["trained_tokens", "trained_normaliser", *LOSS_SUMS,
                *(["loss/kl"] if self.use_kl else [])]  # same keys on every rank: all-reduced
        acc = dict.fromkeys(["normaliser", *keys], 0.0)
        uids: list[int] = []
        for batch in self.drain(step):
            self._micro_batch(m, batch, acc)
            if len(batch):
                uids += batch.columns["uid"].tolist()
                self.q.ack(batch)
        with m.span("optim_step"):
            step_metrics = self.engine.step(acc["normaliser"])
        if self.accounting is not None:
            self.accounting.write(json.dumps({"step": step, "uids": uids}) + "\n")
            self.accounting.flush()
        summed = all_reduce(torch.tensor([acc[k] for k in keys], dtype=torch.float64),
                            self.drain.group)
        total = dict(zip(keys, summed.tolist(), strict=True))
        m.record(step_metrics)
        self._record_loss(m, total, step_metrics["optim/normaliser"])
        return total

    def run_step(self, step: int) -> Metrics:
        m = Metrics(self.name, step)
        t0 = time.perf_counter()
        total = self._update(m, step)
        train_s = time.perf_counter() - t0
        if self.checkpoint is not None:
            with m.span("checkpoint"):
                self.checkpoint(self.engine.policy_version)
        self.send_weights(step, m)
        now = time.perf_counter()
        m.record({"train/time_s": train_s, "train/tokens": total["trained_tokens"],
                  "perf/step_time_s": now - self._last_end,
                  "policy_version": self.engine.policy_version})
        self._last_end = now
        return m
