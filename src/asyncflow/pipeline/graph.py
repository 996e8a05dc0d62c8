"""The GRPO stage graph, declared once, and how each stage is built on its ranks.

```
 eval       first rollout rank, main thread   held-out accuracy every eval_every steps
 prompts    rank 0                            -> prompt_ids, uid
 rollout    rollout ranks, main thread        prompt_ids -> response_ids, behaviour_logprobs,
                                              finished
 reward     rollout ranks                     response_ids, finished, uid -> reward
 advantage  first rollout rank                reward (+ finished) -> advantage (whole groups)
 weights    rollout ranks (split only)        new policy versions from the train mesh
 reference  train ranks (only with KL)        prompt_ids, response_ids -> ref_logprobs
 train      train ranks, main thread          every column above -> optimizer step, weights out
```

Advantages are computed on the rollout side, where the rewards they need live. Moving the
reward and advantage stages to the train rank, or onto the rollout rank's main thread, made no
measurable difference to the default's step time. `with_stages` adds a user's stages before the
train mesh's, so a column they produce can be one the train stage is given (see `map_stage`).
"""

from __future__ import annotations

import functools
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asyncflow.checkpoint import Checkpointer, truncate_jsonl
from asyncflow.engines import RolloutEngine, SamplingParams, build_rollout_engine
from asyncflow.engines.fsdp_engine import FSDPTrainEngine
from asyncflow.log import get_logger
from asyncflow.models import save_weights
from asyncflow.pipeline.context import RunContext
from asyncflow.pipeline.control import StopRequested
from asyncflow.pipeline.stage import Metrics, Stage, StageBase, StageDecl
from asyncflow.pipeline.stages import (
    AdvantageStage,
    EvalStage,
    PromptStage,
    RewardStage,
    RolloutStage,
    VersionGate,
    WeightReceiveStage,
    drain_step,
)
from asyncflow.pipeline.trainer import DataParallelDrain, ReferenceStage, TrainStage
from asyncflow.queue import ColumnSpec
from asyncflow.tasks import Problem
from asyncflow.weights import LocalSync, build_weight_sync, weight_specs

logger = get_logger(__name__)

TRAIN_COLUMNS = ["prompt_ids", "uid", "response_ids", "behaviour_logprobs", "advantage"]


def grpo_graph(ctx: RunContext) -> list[StageDecl]:
    R, kl = ctx.cfg.rollout.max_new_tokens, ctx.cfg.algorithm.kl_coef > 0

    def col(name, dtype, per_row=()):
        return ColumnSpec(name, dtype, list(per_row), ragged=bool(per_row))

    return [
        StageDecl("eval", "rollout_first", _eval, main=True, through_end=True),
        StageDecl("prompts", "host", _prompts, produces=[
            col("prompt_ids", "int64", [ctx.max_prompt_len]), col("uid", "int64")]),
        StageDecl("rollout", "rollout", _rollout, ["prompt_ids"], [
            col("response_ids", "int64", [R]), col("behaviour_logprobs", "float32", [R]),
            col("finished", "int64")], main=True),
        StageDecl("reward", "rollout", _reward, ["response_ids", "finished", "uid"],
                  [col("reward", "float32")]),
        StageDecl("advantage", "rollout_first", _advantage,
                  ["reward"] + (["finished"] if ctx.cfg.algorithm.mask_truncated else []),
                  [col("advantage", "float32")]),
        StageDecl("weights", "rollout", _weights, split_only=True),
        *([StageDecl("reference", "train", _reference, ["prompt_ids", "response_ids"],
                     [col("ref_logprobs", "float32", [R])])] if kl else []),
        StageDecl("train", "train", _train, TRAIN_COLUMNS + (["ref_logprobs"] if kl else []),
                  main=True, reports=["weight_send"]),
    ]


def with_stages(graph: list[StageDecl], extra: list[StageDecl]) -> list[StageDecl]:
    """`graph` with `extra` inserted before its first train-mesh stage."""
    at = next((i for i, d in enumerate(graph) if d.mesh == "train"), len(graph))
    return graph[:at] + list(extra) + graph[at:]


class _MapStage(StageBase):
    def __init__(self, ctx: RunContext, name: str, needs: list[str], fn):
        self.name, self.ctx, self.needs, self.fn = name, ctx, needs, fn

    def run_step(self, step: int) -> Metrics:
        m, s = Metrics(self.name, step), self.ctx.shape
        for batch in drain_step(self.ctx.client, self.name, step, s.rows_per_step, s.timeout_s,
                                self.needs):
            with m.span(self.name):
                produced = self.fn(batch.columns, m)
            if produced:
                self.ctx.client.put(produced, rows=batch.row_ids, ack=batch)
            else:
                self.ctx.client.ack(batch)
        return m


def map_stage(name: str, mesh: str, needs: list[str], fn: Callable[[dict, Metrics], dict],
              produces: list[ColumnSpec] | None = None) -> StageDecl:
    """A stage that maps each batch of a step's rows: `fn(columns, metrics)` gets the `needs`
    columns (a tensor per column, ragged ones as `Ragged`) and the step's `Metrics` to record
    into, and returns the `produces` columns, one value per row, or {} (e.g. a monitor). Runs
    on every rank of `mesh` as rows are ready, on a thread of its own in the split placement."""
    return StageDecl(name, mesh, lambda ctx: _MapStage(ctx, name, needs, fn), list(needs),
                     list(produces or []))


@dataclass
class RolloutSide:
    """What the rollout-side stages of one rank share."""

    engine: RolloutEngine
    gate: VersionGate
    commit_lock: threading.Lock
    """Held by an evaluation: no new version lands mid-evaluation."""


def rollout_side(ctx: RunContext) -> RolloutSide:
    def make():
        engine = build_rollout_engine(ctx.cfg.engine, ctx.model_dir, policy_version=0)
        side = RolloutSide(engine, VersionGate(engine, ctx.shape.max_staleness),
                           threading.Lock())
        ctx.on_abort(side.gate.cancel)
        ctx.on_close(engine.shutdown)
        return side

    return ctx.shared("rollout", make)


def weight_sync(ctx: RunContext):
    """Train rank 0 to the rollout ranks; colocated ranks load their own engine (LocalSync)."""
    def make():
        m = ctx.meshes
        if m.sync_group is None or m.colocated:
            return LocalSync()
        from asyncflow.models import build_model

        meta = build_model(ctx.model_cfg, device="meta")
        return build_weight_sync(ctx.cfg.weight_sync, weight_specs(meta), m.sync_group,
                                 m.sync_src, m.sync_device, ctx.run_dir)

    return ctx.shared("weight_sync", make)


def _eval(ctx: RunContext) -> Stage:
    side, cfg = rollout_side(ctx), ctx.cfg
    samples = ctx.run_dir / "eval_samples.jsonl"  # rolled back with a resume, like the metrics
    truncate_jsonl(samples, ctx.start)
    return EvalStage(side.engine, side.gate, side.commit_lock, ctx.task, ctx.tokenizer,
                     ctx.shape, cfg.pipeline.eval_every, cfg.pipeline.eval_size,
                     cfg.rollout.max_new_tokens, cfg.task.reward_timeout_s, samples)


def train_problems(ctx: RunContext) -> Callable[[int], Problem]:
    """`task.train_problem`, remembered per rank for the problems of the steps the queue can
    hold and one more: the prompt stage builds each problem and the reward stage of the same
    rank needs it again a step or two later (the tiny task builds one from a string-seeded RNG:
    0.41-0.42 ms for a step's 32, 0.003-0.004 ms remembered). `lru_cache` is thread-safe."""
    s = ctx.shape
    return ctx.shared("train_problems", lambda: functools.lru_cache(
        maxsize=(s.max_staleness + 3) * s.prompts_per_step)(ctx.task.train_problem))


def _prompts(ctx: RunContext) -> Stage:
    return PromptStage(ctx.client, train_problems(ctx), ctx.tokenizer, ctx.shape,
                       ctx.resume.prompt_step if ctx.resume else 0)


def _rollout(ctx: RunContext) -> Stage:
    side, r = rollout_side(ctx), ctx.cfg.rollout
    sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k)
    p = ctx.cfg.pipeline
    share = -(-p.prompts_per_step // len(ctx.meshes.rollout_ranks)) * p.group_size
    # a row's sampling seed depends on the row id only, not on which rollout rank drew it, so
    # a resumed run (or another timing) samples the same tokens for it
    return RolloutStage(ctx.client, side.engine, side.gate, sampling, ctx.shape,
                        ctx.cfg.run.seed * 7919, share)


def _reward(ctx: RunContext) -> Stage:
    a = ctx.cfg.algorithm
    return RewardStage(ctx.client, ctx.task, ctx.tokenizer, ctx.shape,
                       ctx.cfg.task.reward_timeout_s, ctx.cfg.task.on_reward_failure,
                       (ctx.cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty),
                       train_problems(ctx))


def _advantage(ctx: RunContext) -> Stage:
    a = ctx.cfg.algorithm
    return AdvantageStage(ctx.client, ctx.shape, a.baseline, a.normalize_std,
                          resumed=ctx.resume is not None, mask_truncated=a.mask_truncated)


def _weights(ctx: RunContext) -> Stage:
    side = rollout_side(ctx)
    return WeightReceiveStage(side.engine, side.gate, side.commit_lock, weight_sync(ctx))


def _drain(ctx: RunContext, stage: str, group, columns: list[str], streaming: bool):
    m = ctx.meshes
    return DataParallelDrain(ctx.client, stage, group, m.train_ranks.index(m.rank),
                             len(m.train_ranks), ctx.shape, ctx.cfg.trainer.micro_batch_size,
                             columns, streaming, resumed=ctx.resume is not None)


def _reference(ctx: RunContext) -> Stage:
    from torch.distributed.device_mesh import DeviceMesh

    m, cfg = ctx.meshes, ctx.cfg
    engine = FSDPTrainEngine(str(ctx.model_dir), DeviceMesh.from_group(m.reference_group,
                                                                       m.device.type),
                             None, cfg.trainer.precision, str(m.device))
    drain = _drain(ctx, "reference", m.reference_group, ["prompt_ids", "response_ids"], True)
    return ReferenceStage(ctx.client, engine, drain, cfg.rollout.temperature)


def _train(ctx: RunContext) -> Stage:
    m, cfg, p = ctx.meshes, ctx.cfg, ctx.cfg.pipeline
    policy = FSDPTrainEngine(str(ctx.model_dir), m.train_mesh, cfg.trainer.optim,
                             cfg.trainer.precision, str(m.device), p.num_steps,
                             cfg.trainer.activation_checkpointing)
    group = m.train_mesh.get_group()
    columns = TRAIN_COLUMNS + (["ref_logprobs"] if cfg.algorithm.kl_coef > 0 else [])
    drain = _drain(ctx, "train", group, columns, p.streaming)
    dp_rank = m.train_ranks.index(m.rank)
    ckpt = Checkpointer(ctx.run_dir / "checkpoints", cfg.checkpoint, group, dp_rank)
    if ctx.resume is not None:
        ckpt.load(ctx.resume.path, policy)
    # per-prompt accounting: which problems each step trained, rolled back on resume
    accounting = ctx.run_dir / "accounting" / f"train_rank{dp_rank}.jsonl"
    accounting.parent.mkdir(exist_ok=True)
    truncate_jsonl(accounting, ctx.start)
    hook = CheckpointHook(ctx, policy, ckpt, group, dp_rank)
    return TrainStage(ctx.client, policy, drain, cfg.algorithm, cfg.rollout.temperature,
                      weight_sync(ctx), ctx.report,
                      local_engine=rollout_side(ctx).engine if m.colocated else None,
                      background=cfg.weight_sync.background, accounting=accounting,
                      checkpoint=hook, at_close=hook.export_final,
                      restored_step=ctx.start if ctx.resume is not None else None)


class CheckpointHook:
    """After each optimizer step: a checkpoint when due or when a stop was requested (then
    `StopRequested`); after the last step, the policy in HF format under `export/`."""

    def __init__(self, ctx: RunContext, policy: FSDPTrainEngine, ckpt: Checkpointer, group,
                 dp_rank: int):
        self.ctx, self.policy, self.ckpt, self.group = ctx, policy, ckpt, group
        self.leader = dp_rank == 0

    def __call__(self, version: int) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        stopping = ctx.stop.agreed(self.group)
        if stopping or self.ckpt.due(version, cfg.pipeline.num_steps):
            export = ((lambda out: export_hf(self.policy, ctx.model_dir, out, self.leader))
                      if cfg.checkpoint.export_hf else None)
            self.ckpt.save(version, self.policy, ctx.client.snapshot,
                           {"num_steps": cfg.pipeline.num_steps}, export=export)
        if stopping:
            if self.leader:
                ctx.stop.announce(version)
            logger.info("stop requested: checkpoint step_%d written; exiting", version)
            raise StopRequested(version)

    def export_final(self) -> None:
        t0 = time.perf_counter()
        export_hf(self.policy, self.ctx.model_dir, self.ctx.run_dir / "export", self.leader)
        logger.debug("exported in %.2f s", time.perf_counter() - t0)


def export_hf(engine: FSDPTrainEngine, model_dir: Path, out: Path, leader: bool) -> None:
    """The policy in HF format (config.json, model.safetensors, tokenizer files), loadable by
    transformers; every train rank must call it (the full weights are gathered)."""
    named = dict(engine.full_weights())
    if leader:
        save_weights(named, engine.config, out)
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (model_dir / f).exists():
                shutil.copy(model_dir / f, out / f)

