"""Llama/Qwen2 models, HF checkpoints in and out, and tokenizers."""

from asyncflow.models.checkpoint import (
    CheckpointError,
    load_pretrained,
    load_state_into,
    save_pretrained,
    save_weights,
)
from asyncflow.models.config import ConfigFileError, ModelConfig
from asyncflow.models.tokenizer import Tokenizer, TokenizerError
from asyncflow.models.transformer import CausalLM, KVCache, build_model

__all__ = [
    "CausalLM",
    "CheckpointError",
    "ConfigFileError",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "TokenizerError",
    "build_model",
    "load_pretrained",
    "load_state_into",
    "save_pretrained",
    "save_weights",
]
