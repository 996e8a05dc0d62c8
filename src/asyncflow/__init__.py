"""asyncflow: PyTorch-native asynchronous streaming RL for LLM post-training.

Public names: `train` (run a job from Python under torchrun), `load_config` (the packaged configs
composed with overrides), `Config`, `ConfigError`. Imports are lazy: `import asyncflow` does not
import torch.
"""

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "__version__", "load_config", "train"]


def __getattr__(name: str):
    if name == "train":
        from asyncflow.api import train

        return train
    if name in ("Config", "ConfigError", "load_config"):
        from asyncflow import config

        return getattr(config, name)
    raise AttributeError(f"module 'asyncflow' has no attribute {name!r}")
