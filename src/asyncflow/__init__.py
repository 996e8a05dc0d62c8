"""asyncflow: PyTorch-native asynchronous streaming RL for LLM post-training.

Public names: `train` (run a job from Python under torchrun), `load_config` (the packaged configs
composed with overrides), `Config`, `ConfigError`; for stages of your own, `StageDecl`,
`map_stage`, `Metrics` and `ColumnSpec`. Imports are lazy: `import asyncflow` does not import
torch.
"""

__version__ = "0.1.0"
__all__ = ["ColumnSpec", "Config", "ConfigError", "Metrics", "StageDecl", "__version__",
           "load_config", "map_stage", "train"]


def __getattr__(name: str):
    if name == "train":
        from asyncflow.api import train

        return train
    if name in ("Config", "ConfigError", "load_config"):
        from asyncflow import config

        return getattr(config, name)
    if name in ("StageDecl", "Metrics"):
        from asyncflow.pipeline import stage

        return getattr(stage, name)
    if name == "map_stage":
        from asyncflow.pipeline.graph import map_stage

        return map_stage
    if name == "ColumnSpec":
        from asyncflow.queue import ColumnSpec

        return ColumnSpec
    raise AttributeError(f"module 'asyncflow' has no attribute {name!r}")
