"""Rollout engines behind one protocol (`RolloutEngine`), built from config by `kind`."""

from __future__ import annotations

from pathlib import Path

from asyncflow.engines.base import (
    Completion,
    EngineHealth,
    GenerationRequest,
    RolloutEngine,
    RolloutEngineConfig,
    SamplingParams,
)
from asyncflow.engines.sglang_engine import SGLangEngineConfig
from asyncflow.engines.torch_engine import TorchEngineConfig, TorchRolloutEngine
from asyncflow.models.transformer import CausalLM


def _build_torch(cfg: RolloutEngineConfig, model_or_path: CausalLM | str | Path,
                 policy_version: int) -> RolloutEngine:
    if not isinstance(cfg, TorchEngineConfig):
        raise TypeError(f"engine kind 'torch' needs a TorchEngineConfig, got {type(cfg).__name__}")
    model = model_or_path
    if not isinstance(model, CausalLM):
        from asyncflow.models.checkpoint import load_pretrained

        model = load_pretrained(model_or_path, device=cfg.device)
    return TorchRolloutEngine(model, cfg, policy_version=policy_version)


def _build_sglang(cfg: RolloutEngineConfig, model_or_path: CausalLM | str | Path,
                  policy_version: int) -> RolloutEngine:
    if not isinstance(cfg, SGLangEngineConfig):
        raise TypeError(f"engine kind 'sglang' needs an SGLangEngineConfig, got "
                        f"{type(cfg).__name__}")
    if isinstance(model_or_path, CausalLM):
        raise TypeError("engine kind 'sglang' serves an HF checkpoint directory, not a model "
                        "object; save it with asyncflow.models.save_pretrained first")
    from asyncflow.engines.sglang_engine import SGLangRolloutEngine

    return SGLangRolloutEngine(model_or_path, cfg, policy_version=policy_version)


ENGINES = {"torch": _build_torch, "sglang": _build_sglang}
ENGINE_KINDS = tuple(ENGINES)


def build_rollout_engine(cfg: RolloutEngineConfig, model_or_path: CausalLM | str | Path,
                         policy_version: int = 0) -> RolloutEngine:
    """Build the engine `cfg.kind` names, serving a model object or an HF checkpoint dir."""
    build = ENGINES.get(cfg.kind)
    if build is None:
        raise ValueError(f"engine kind {cfg.kind!r} is unknown; valid kinds: {list(ENGINE_KINDS)}")
    return build(cfg, model_or_path, policy_version)


__all__ = [
    "ENGINE_KINDS",
    "Completion",
    "EngineHealth",
    "GenerationRequest",
    "RolloutEngine",
    "RolloutEngineConfig",
    "SGLangEngineConfig",
    "SamplingParams",
    "TorchEngineConfig",
    "TorchRolloutEngine",
    "build_rollout_engine",
]
