"""FSDP2 train engine: log-probs, streaming loss accumulation, exact step normalisation.

Streaming training: `forward_backward` runs on each micro-batch as it arrives and leaves
gradients UN-normalised (FSDP's divide factor is set to 1, so reduce-scatter sums over ranks);
`step(local_normaliser)` all-reduces the normaliser over the train mesh, scales gradients once by
its inverse, clips and steps. The result equals one full-batch mean loss exactly (up to float
summation order), whatever the micro-batching. Every train rank must run the same number of
forward_backward calls per step (FSDP collectives); the queue's DP sampler guarantees that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from asyncflow.algorithms import token_logprobs
from asyncflow.engines.sequences import PackedBatch, SharedPromptBatch
from asyncflow.models import CausalLM, load_pretrained

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then a constant or decaying LR, and gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate (> 0)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up from lr/warmup_steps to lr."""
    schedule: str = "constant"
    """After warm-up: `constant`, or `cosine` / `linear` decay to min_lr_ratio * lr at the last
    step of the run (pipeline.num_steps)."""
    min_lr_ratio: float = 0.1
    """Where a decaying schedule ends, as a fraction of lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (<= 0 disables clipping)."""
    max_nonfinite_steps: int = 3
    """Steps in a row whose loss or gradient is not finite (each one skipped) that stop the run."""

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"trainer.optim.lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"trainer.optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"trainer.optim.schedule={self.schedule!r}; use one of "
                             f"{list(_SCHEDULES)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"trainer.optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"trainer.optim.max_nonfinite_steps={self.max_nonfinite_steps} "
                             "must be >= 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"trainer.optim.betas={self.betas} must be two numbers in [0, 1)")


@dataclass
class PrecisionConfig:
    """FSDP2 mixed precision: dtype of parameters in compute and of gradient reduction."""

    param_dtype: str = "float32"
    """float32 on CPU; bfloat16 on GPU."""
    reduce_dtype: str = "float32"
    """Dtype gradients are reduce-scattered in."""

    def __post_init__(self):
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"trainer.precision.{name}={getattr(self, name)!r}; use one of {list(_DTYPES)}")


def all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`dist.all_reduce` in place, skipped on a one-rank group (every default schedule has one
    train rank), where gloo still costs ~0.15 ms a call. The group's size is the same on each of
    its ranks, so all of them skip or none does."""
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op, group=group)
    return t


def apply_fsdp(model: CausalLM, mesh: DeviceMesh, precision: PrecisionConfig) -> CausalLM:
    """fully_shard every block, then the root (embeddings, final norm, LM head).

    A one-rank mesh in fp32 has nothing to shard, reduce or cast: the model stays a plain module,
    which computes the same, because FSDP's per-module hooks and DTensor parameters cost ~20% of a
    train step of the tiny default model there (measured). Mixed precision keeps FSDP (it holds
    the fp32 master weights).
    """
    if mesh.size() == 1 and precision.param_dtype == "float32":
        return model
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[precision.param_dtype],
                              reduce_dtype=_DTYPES[precision.reduce_dtype])
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # plain SUM over ranks (gloo has no PREMUL_SUM); step() divides once by the normaliser
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def lr_factor(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """LR multiplier of optimizer step `step` (0-based): linear warm-up over warmup_steps, then
    constant or decaying (cosine / linear) to min_lr_ratio at step total_steps - 1."""
    warm = optim.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if optim.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total_steps - 1 - warm))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if optim.schedule == "cosine" else 1 - frac
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape

    return factor


class FSDPTrainEngine:
    """The policy (or a frozen reference) sharded over the train mesh."""

    def __init__(self, model_dir: str, mesh: DeviceMesh, optim: OptimConfig | None,
                 precision: PrecisionConfig | None = None, device: str = "cpu",
                 total_steps: int = 1, activation_checkpointing: bool = False):
        self.mesh, self.device = mesh, torch.device(device)
        model = load_pretrained(model_dir, dtype=torch.float32, device=device)
        model.model.activation_checkpointing = activation_checkpointing
        self.config = model.config
        self.model = apply_fsdp(model, mesh, precision or PrecisionConfig())
        self.policy_version = 0
        self.nonfinite_streak = 0
        """Optimizer steps in a row skipped for a non-finite loss or gradient."""
        self.optimizer = None
        if optim is not None:
            self.model.train()
            # fused: one kernel for all parameters. One tensor at a time (the default on CPU)
            # pays DTensor dispatch per op: gradient scaling, clipping and the step of the tiny
            # model on one FSDP2 rank took 11.8-13.6 ms, fused 4.4-5.5 ms (2-core Xeon VM)
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                eps=optim.eps, weight_decay=optim.weight_decay, fused=True)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lr_factor(optim, total_steps))
            self.max_grad_norm = optim.max_grad_norm
            self.max_nonfinite_steps = optim.max_nonfinite_steps
        else:
            self.model.eval().requires_grad_(False)

    def _logprobs(self, batch: PackedBatch | SharedPromptBatch, temperature: float) -> torch.Tensor:
        return token_logprobs(batch.logits(self.model), batch.targets_BT, temperature)

    @torch.no_grad()
    def logprobs(self, batch: PackedBatch | SharedPromptBatch,
                 temperature: float = 1.0) -> torch.Tensor:
        """Log-probs [B, T] of every target token (meaningful where response_mask is 1)."""
        return self._logprobs(batch, temperature)

    def forward_backward(
        self, batch: PackedBatch | SharedPromptBatch,
        loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        temperature: float = 1.0,
    ) -> dict[str, float]:
        """Backward of loss_fn(logprobs_BT), a SUM over this micro-batch; grads accumulate."""
        assert self.optimizer is not None, "forward_backward on a frozen engine"
        loss, sums = loss_fn(self._logprobs(batch, temperature))
        loss.backward()
        return {"loss/sum": loss.item(), **{k: v.item() for k, v in sums.items()}}

    def step(self, local_normaliser: float) -> dict[str, float]:
        """Scale gradients by 1 / (normaliser summed over the mesh), clip, step, bump version.

        A non-finite gradient norm (from a NaN/inf loss or gradient on any rank: the norm is
        global) skips the update but still bumps the version (same weights), so the rollout side
        sees one version per step; `max_nonfinite_steps` skips in a row raise FloatingPointError."""
        total = all_reduce(torch.tensor([float(local_normaliser)], dtype=torch.float64),
                           self.mesh.get_group()).item()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if total > 0:
            for p in params:
                p.grad.div_(total)
        if self.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
        lr = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.policy_version += 1
        if self.nonfinite_streak >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.nonfinite_streak} optimizer steps in a row had a non-finite loss or "
                f"gradient (grad norm {grad_norm}); stopping (trainer.optim.max_nonfinite_steps="
                f"{self.max_nonfinite_steps}). Lower trainer.optim.lr or check the rewards.")
        return {"optim/grad_norm": grad_norm, "optim/lr": lr, "optim/normaliser": total,
                "optim/skipped": float(not finite), "alarm/nonfinite_streak": self.nonfinite_streak}

    def full_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for every weight; every train rank must iterate it together."""
        tied = self.config.tie_word_embeddings
        for name, p in self.model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            yield name, p.full_tensor() if isinstance(p, DTensor) else p
