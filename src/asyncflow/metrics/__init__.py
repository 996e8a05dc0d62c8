"""Metric sinks: console progress line, JSONL file, Weights & Biases.

Stages return `{name: value}`; only the pipeline hands per-step dicts to the sinks (on rank 0).
wandb is imported lazily and respects WANDB_MODE (offline and disabled work without network).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from asyncflow.log import get_logger

logger = get_logger(__name__)


@dataclass
class MetricsConfig:
    """Where per-step metrics go (rank 0 only)."""

    jsonl: bool = True
    """Write runs/<name>/metrics.jsonl, one JSON object per step."""
    console: bool = True
    """Log a progress line per step: step, reward, accuracy, tokens/s, staleness, ETA."""
    wandb: bool = False
    """Also log to Weights & Biases (mode from WANDB_MODE)."""
    wandb_project: str = "asyncflow"
    """wandb project name."""


class MetricSink(Protocol):
    def write(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: Path):
        self._f = open(path, "a", buffering=1)  # line-buffered: a crash loses at most a line

    def write(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                 for k, v in metrics.items()}
        self._f.write(json.dumps({"step": step, **clean}) + "\n")

    def close(self) -> None:
        self._f.close()


class ConsoleSink:
    """One progress line per step, with an ETA from the mean step time so far."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total, self.start, self.t0 = total_steps, start_step, time.perf_counter()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        done = min(step + 1, self.total)
        eta = ((time.perf_counter() - self.t0) / max(done - self.start, 1)
               * (self.total - done))
        parts = [f"step {done}/{self.total}" if step < self.total else "final"]
        for key, label, fmt in (("reward/mean", "reward", ".3f"),
                                ("eval/accuracy", "eval acc", ".3f"),
                                ("perf/tokens_per_s", "tok/s", ".0f"),
                                ("staleness/max", "stale", ".0f")):
            if key in metrics and metrics[key] is not None:
                parts.append(f"{label} {metrics[key]:{fmt}}")
        parts.append(f"ETA {eta:.0f}s" if step < self.total else
                     f"{time.perf_counter() - self.t0:.0f}s in all")
        logger.info(" | ".join(parts))

    def close(self) -> None:
        pass


class WandbSink:
    def __init__(self, project: str, name: str, run_dir: Path, config: dict[str, Any]):
        import wandb

        self._wandb = wandb
        # id = run name: a resumed run continues its wandb run
        self._run = wandb.init(project=project, name=name, id=name, resume="allow",
                               dir=str(run_dir), config=config)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


def build_sinks(cfg: MetricsConfig, run_dir: Path, run_name: str, total_steps: int,
                config: dict[str, Any], start_step: int = 0) -> list[MetricSink]:
    sinks: list[MetricSink] = []
    if cfg.jsonl:
        sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
    if cfg.console:
        sinks.append(ConsoleSink(total_steps, start_step))
    if cfg.wandb:
        sinks.append(WandbSink(cfg.wandb_project, run_name, run_dir, config))
    return sinks
