"""asyncflow: PyTorch-native asynchronous streaming RL for LLM post-training."""

__version__ = "0.1.0"
