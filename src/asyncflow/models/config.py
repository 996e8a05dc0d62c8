"""Model configuration read from (and written to) a Hugging Face `config.json`.

Only the Llama / Qwen2 decoder family is supported; the architecture names below are the ones the
HF ecosystem writes. Everything else is refused with a one-line `ValueError`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class ConfigFileError(ValueError):
    """A config.json that is missing, not JSON, or describes a model we cannot build."""


@dataclass
class ModelConfig:
    """Architecture of a Llama/Qwen2 decoder, field names as in HF `config.json`."""

    vocab_size: int
    """Rows of the embedding and of the LM head."""
    hidden_size: int
    """Residual stream width d."""
    intermediate_size: int
    """SwiGLU hidden width."""
    num_hidden_layers: int
    """Number of transformer blocks."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int | None = None
    """Key/value heads (GQA); None means equal to num_attention_heads."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """HF rope-scaling dict (`rope_type` linear/dynamic/llama3/yarn and its parameters) or None."""
    max_position_embeddings: int = 2048
    """Context window: the longest prompt + completion the model accepts."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    attention_bias: bool = False
    """Bias on q/k/v/o projections (Llama's flag)."""
    qkv_bias: bool = False
    """Bias on q/k/v only (always true for Qwen2)."""
    mlp_bias: bool = False
    """Bias on the MLP projections (Llama's flag)."""
    model_type: str = "llama"
    """`llama` or `qwen2`."""
    bos_token_id: int | None = None
    """Begin-of-sequence id, if the model has one."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence id(s)."""
    pad_token_id: int | None = None
    """Padding id, if any."""
    torch_dtype: str = "float32"
    """Dtype the weights are stored in."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of config.json, kept so that a saved config round-trips."""

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigFileError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigFileError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, name) < 1:
                raise ConfigFileError(f"{name}={getattr(self, name)} must be >= 1")
        if self.rope_scaling is not None:
            kind = self.rope_type
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ConfigFileError(
                    f"rope_scaling type {kind!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}"
                )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if archs and not known:
            raise ConfigFileError(
                f"{source}: unsupported architecture {archs[0]!r}; asyncflow builds "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if known:
            model_type = SUPPORTED_ARCHITECTURES[known[0]]
        if model_type not in SUPPORTED_ARCHITECTURES.values():
            raise ConfigFileError(
                f"{source}: unsupported model_type {model_type!r}; asyncflow builds llama and qwen2"
            )
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads")
            if k not in d
        ]
        if missing:
            raise ConfigFileError(f"{source}: missing required key(s) {missing}")
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["model_type"] = model_type
        kwargs["qkv_bias"] = model_type == "qwen2" or bool(d.get("attention_bias", False))
        if "torch_dtype" not in d and "dtype" in d:
            kwargs["torch_dtype"] = d["dtype"]
        kwargs.setdefault("torch_dtype", "float32")
        if d.get("rope_parameters") and not d.get("rope_scaling"):
            # transformers 5 writes rope settings under `rope_parameters` (theta included).
            rp = dict(d["rope_parameters"])
            kwargs["rope_theta"] = rp.pop("rope_theta", kwargs.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = rp
        extra = {k: v for k, v in d.items() if k not in names and k not in ("dtype",)}
        for k, v in kwargs.items():
            if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads") and not isinstance(v, int):
                raise ConfigFileError(f"{source}: {k}={v!r} must be an integer")
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        qkv_bias = d.pop("qkv_bias")
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d.pop("mlp_bias")
            arch = "Qwen2ForCausalLM"
        else:
            d["attention_bias"] = self.attention_bias or qkv_bias
            arch = "LlamaForCausalLM"
        out = {**extra, **d, "architectures": [arch]}
        out.pop("rope_parameters", None)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigFileError(f"{path}: no such file (a model directory needs config.json)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigFileError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigFileError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf_dict(d, source=str(path))

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
